"""The SHAP math: explain_rows, the explainer a run resolves, and shapline's kernel engine and its solver."""
