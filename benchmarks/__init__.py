"""Benchmarks: shapline against plain shap and xgboost, side by side; run with `python -m benchmarks`."""
