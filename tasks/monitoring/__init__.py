"""Attribution drift: the pure maths (NDCG, Wasserstein, per-feature tables) and the MLflow queries for baselines."""
