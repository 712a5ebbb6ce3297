"""Hyperparameter search: Optuna studies of orchestra-train trials (docs/sweeps.md)."""
