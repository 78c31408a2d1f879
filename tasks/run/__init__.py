"""One run's resources and records: ExplanationRun, what a run records in MLflow, the monitor step."""
