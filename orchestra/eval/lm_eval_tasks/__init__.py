"""lm-evaluation-harness task YAMLs for the bundled example sets (data only; see orchestra/eval/harness.py)."""
