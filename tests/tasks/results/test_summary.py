"""The words a finished run says about itself."""

from __future__ import annotations


def test_the_accuracy_sentence_says_what_the_estimator_spent_and_what_to_do_when_rows_fall_short() -> None:
    from shapline.tasks.results.summary import accuracy_sentence

    assert accuracy_sentence({"model_rows": None}) == ""  # not a kernel run
    spent = {"model_rows": 1_517_760, "coalitions_per_row": 2108.0, "rows_explained": 24}
    assert accuracy_sentence({**spent, "rows_unconverged": None}) == (
        "estimator shap: median 2,108 coalitions per row, 1,517,760 model rows; no standard errors "
        "(explainer.estimator: adaptive gives them)"
    )
    adaptive = {**spent, "tolerance": 0.005}
    assert accuracy_sentence({**adaptive, "rows_unconverged": 0, "max_standard_error": 0.0}).startswith(
        "estimator adaptive: every value exact, standard error 0 (median 2,108"
    )
    assert accuracy_sentence({**adaptive, "rows_unconverged": 0, "max_standard_error": 0.0012}).startswith(
        "estimator adaptive: every row within tolerance 0.005 (median"
    )
    short = accuracy_sentence({**adaptive, "rows_unconverged": 3, "max_standard_error": 0.05})
    assert short.startswith("estimator adaptive: 3 of 24 rows spent nsamples without meeting tolerance 0.005")
    assert short.endswith("raise explainer.nsamples or explainer.tolerance for them to converge")
