"""The lasso LARS path from a Gram matrix: scikit-learn's `lars_path_gram(method="lasso")`, step for step.

Kernel SHAP with `l1_reg: aic` or `bic` runs one LARS path per explained row and output (a step per
feature that enters). scikit-learn's solver spends much of that in the argument checks of scipy's
`solve_triangular`, made at every step; this is its Gram branch with the same LAPACK and BLAS calls on
the same memory layouts, so every number is the same, bit for bit (tested against scikit-learn on the
benchmark's designs and on paths that drop variables), without those checks.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.linalg.lapack import get_lapack_funcs
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.arrayfuncs import cholesky_delete, min_pos

from shapline.tasks.explainers import native

__all__ = ["lasso_path_gram"]

_TINY32 = np.finfo(np.float32).tiny  # scikit-learn's guard against a division by zero
_EQUALITY_TOLERANCE = np.finfo(np.float32).eps


def lasso_path_gram(
    xy: np.ndarray, gram: np.ndarray, n_samples: int, max_iter: int = 500, eps: float = np.finfo(float).eps
) -> tuple[np.ndarray, list[int], np.ndarray]:
    """(alphas, active, coefs (features, steps)) as lars_path_gram(xy, gram, n_samples=n_samples,
    alpha_min=0, method="lasso", max_iter=max_iter, eps=eps) returns them, for float64 inputs.

    The compiled path (`native.lasso_path`: the same BLAS and LAPACK calls, without Python between
    them) gives it when it can; a path that drops a variable, meets a degenerate regressor or stops
    early (scikit-learn warns there) is taken again here, step for step.
    """
    compiled = native.lasso_path(xy, gram, n_samples, max_iter, eps, python_lasso_path_gram)
    if compiled is not None:
        return compiled
    return python_lasso_path_gram(xy, gram, n_samples, max_iter, eps)


def warm_up() -> None:
    """Load the compiled path's machine code and check it against this one, now (compiled.warm_up)."""
    native.available(python_lasso_path_gram)


def python_lasso_path_gram(
    xy: np.ndarray, gram: np.ndarray, n_samples: int, max_iter: int = 500, eps: float = np.finfo(float).eps
) -> tuple[np.ndarray, list[int], np.ndarray]:
    """lasso_path_gram in Python: every branch, each BLAS and LAPACK call made from Python."""
    cov = np.array(xy, dtype=np.float64, order="C")
    gram = np.array(gram, dtype=np.float64, order="C")  # scikit-learn's copy: the dot below sees its layout
    n_features = cov.shape[0]
    if gram.shape != (n_features, n_features):
        raise ValueError("The shapes of the inputs Gram and Xy do not match.")
    max_features = min(max_iter, n_features)
    coefs = np.zeros((max_features + 1, n_features))
    alphas = np.zeros(max_features + 1)
    n_iter, n_active = 0, 0
    active: list[int] = []
    indices = np.arange(n_features)
    sign_active = np.empty(max_features, dtype=np.int8)
    drop = False
    lower = np.empty((max_features, max_features))  # the Cholesky factor; only its lower part is used
    (solve_cholesky,) = get_lapack_funcs(("potrs",), (lower,))
    (trtrs,) = get_lapack_funcs(("trtrs",), (lower, lower))
    cov_precision = np.finfo(cov.dtype).precision
    gram_copy, cov_copy = gram.copy(), cov.copy()
    idx = np.empty(0, dtype=np.intp)

    while True:
        if cov.size:
            c_idx = int(np.abs(cov).argmax())
            c_ = cov[c_idx]
            c_max = np.fabs(c_)
        else:
            c_max = 0.0
        alpha = alphas[n_iter, np.newaxis]
        coef = coefs[n_iter]
        prev_alpha = alphas[n_iter - 1, np.newaxis]
        prev_coef = coefs[n_iter - 1]

        alpha[0] = c_max / n_samples
        if alpha[0] <= _EQUALITY_TOLERANCE:  # alpha_min is 0: the path is complete
            if abs(alpha[0]) > _EQUALITY_TOLERANCE:
                if n_iter > 0:
                    ss = prev_alpha[0] / (prev_alpha[0] - alpha[0])
                    coef[:] = prev_coef + ss * (coef - prev_coef)
                alpha[0] = 0.0
            coefs[n_iter] = coef
            break
        if n_iter >= max_iter or n_active >= n_features:
            break

        if not drop:
            # Append the chosen variable to the Cholesky factorisation of the active set's Gram.
            sign_active[n_active] = np.sign(c_)
            m, n = n_active, c_idx + n_active
            cov[c_idx], cov[0] = cov[0], cov[c_idx]
            indices[n], indices[m] = indices[m], indices[n]
            cov_not_shortened = cov
            cov = cov[1:]
            if m != n:
                gram[[m, n]] = gram[[n, m]]
                gram[:, [m, n]] = gram[:, [n, m]]
            diagonal = gram[n_active, n_active]
            lower[n_active, :n_active] = gram[n_active, :n_active]
            if n_active:
                _solve_lower_in_place(trtrs, lower[:n_active, :n_active], lower[n_active, :n_active])
            v = np.dot(lower[n_active, :n_active], lower[n_active, :n_active])
            diag = max(np.sqrt(np.abs(diagonal - v)), eps)
            lower[n_active, n_active] = diag
            if diag < 1e-7:
                # Degenerate regressors: scikit-learn drops the last one added for good.
                warnings.warn(
                    f"Regressors in active set degenerate. Dropping a regressor, after {n_iter} iterations, "
                    f"i.e. alpha={alpha.item():.3e}, with an active set of {n_active} regressors, and the "
                    f"smallest cholesky pivot element being {diag:.3e}. Reduce max_iter or increase eps "
                    "parameters.",
                    ConvergenceWarning,
                    stacklevel=2,
                )
                cov = cov_not_shortened
                cov[0] = 0
                cov[c_idx], cov[0] = cov[0], cov[c_idx]
                continue
            active.append(int(indices[n_active]))
            n_active += 1

        if n_iter > 0 and prev_alpha[0] < alpha[0]:
            warnings.warn(
                "Early stopping the lars path, as the residues are small and the current value of "
                f"alpha is no longer well controlled. {n_iter} iterations, alpha={alpha.item():.3e}, "
                f"previous alpha={prev_alpha.item():.3e}, with an active set of {n_active} regressors.",
                ConvergenceWarning,
                stacklevel=2,
            )
            break

        least_squares, _ = solve_cholesky(lower[:n_active, :n_active], sign_active[:n_active], lower=True)
        if least_squares.size == 1 and least_squares == 0:
            least_squares[...] = 1
            aa = 1.0
        else:
            aa = 1.0 / np.sqrt((least_squares * sign_active[:n_active]).sum())
            if not np.isfinite(aa):  # an ill-conditioned factor: regularise its diagonal until finite
                i = 0
                factor = lower[:n_active, :n_active].copy()
                while not np.isfinite(aa):
                    factor.flat[:: n_active + 1] += (2**i) * eps
                    least_squares, _ = solve_cholesky(factor, sign_active[:n_active], lower=True)
                    aa = 1.0 / np.sqrt(max(np.sum(least_squares * sign_active[:n_active]), eps))
                    i += 1
            least_squares *= aa

        corr_eq_dir = np.dot(gram[:n_active, n_active:].T, least_squares)
        corr_eq_dir.round(cov_precision, out=corr_eq_dir)
        g1 = min_pos((c_max - cov) / (aa - corr_eq_dir + _TINY32))
        g2 = min_pos((c_max + cov) / (aa + corr_eq_dir + _TINY32))
        gamma_ = min(g1, g2, c_max / aa)

        drop = False
        z = -coef[active] / (least_squares + _TINY32)
        z_pos = min_pos(z)
        if z_pos < gamma_:
            # Some coefficients changed sign: the lasso stops there and drops them.
            idx = np.where(z == z_pos)[0][::-1]
            sign_active[idx] = -sign_active[idx]
            gamma_ = z_pos
            drop = True

        n_iter += 1
        if n_iter >= coefs.shape[0]:
            del coef, alpha, prev_alpha, prev_coef
            add_features = 2 * max(1, (max_features - n_active))
            coefs = np.resize(coefs, (n_iter + add_features, n_features))
            coefs[-add_features:] = 0
            alphas = np.resize(alphas, n_iter + add_features)
            alphas[-add_features:] = 0
        coef = coefs[n_iter]
        prev_coef = coefs[n_iter - 1]
        coef[active] = prev_coef[active] + gamma_ * least_squares
        cov -= gamma_ * corr_eq_dir

        if drop:
            for ii in idx:
                cholesky_delete(lower[:n_active, :n_active], ii)
            n_active -= 1
            drop_idx = [active.pop(ii) for ii in idx]
            for ii in idx:
                for i in range(ii, n_active):
                    indices[i], indices[i + 1] = indices[i + 1], indices[i]
                    gram[[i, i + 1]] = gram[[i + 1, i]]
                    gram[:, [i, i + 1]] = gram[:, [i + 1, i]]
            temp = cov_copy[drop_idx] - np.dot(gram_copy[drop_idx], coef)
            cov = np.r_[temp, cov]
            sign_active = np.delete(sign_active, idx)
            sign_active = np.append(
                sign_active, 0.0
            )  # keeps its length (and, as scikit-learn's, turns float)

    return alphas[: n_iter + 1], active, coefs[: n_iter + 1].T


def _solve_lower_in_place(trtrs: object, factor: np.ndarray, b: np.ndarray) -> None:
    """scipy.linalg.solve_triangular(factor, b, lower=True, overwrite_b=True, check_finite=False), which
    writes the solution into b: the same trtrs call scipy makes (transposed for a C-ordered factor)."""
    if factor.flags.f_contiguous:
        _, info = trtrs(factor, b, overwrite_b=True, lower=True, trans=0, unitdiag=False)  # type: ignore[operator]
    else:
        _, info = trtrs(factor.T, b, overwrite_b=True, lower=False, trans=1, unitdiag=False)  # type: ignore[operator]
    if info > 0:
        raise np.linalg.LinAlgError(f"singular matrix: resolution failed at diagonal {info - 1}")
