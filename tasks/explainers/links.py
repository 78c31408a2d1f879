"""The link functions values are explained in (identity, logit), as shap's links compute them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# shap's LogitLink clips to [1e-15, 1 - 1e-15] before taking log-odds (the kernel engine reproduces it).
LOGIT_EPS = 1e-15
# A model's probabilities are clipped to [1e-7, 1 - 1e-7] before the logit link, so a model that is certain
# (p = 0 or 1) gives large finite log-odds instead of infinities that would poison every sum.
PROBABILITY_EPS = 1e-7


def identity(values: np.ndarray) -> np.ndarray:
    return values


def logit(values: np.ndarray) -> np.ndarray:
    """Log-odds of probabilities, clipped as shap's LogitLink clips them."""
    clipped = np.clip(values, LOGIT_EPS, 1 - LOGIT_EPS)
    return np.log(clipped / (1 - clipped))


LINKS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"identity": identity, "logit": logit}
