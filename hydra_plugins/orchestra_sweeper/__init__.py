"""Orchestra's Hydra Sweeper over Optuna (``hydra/sweeper=orchestra``; see docs/sweeps.md)."""
