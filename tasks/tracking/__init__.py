"""MLflow: the client, runs and artifacts written through an explicit run id (never the fluent per-thread run)."""
