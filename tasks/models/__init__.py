"""A model wherever it lives, behind one Predictor interface: local files, the MLflow registry, SageMaker endpoints."""
