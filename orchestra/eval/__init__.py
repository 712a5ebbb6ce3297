"""Evaluation: tasks, metrics and statistics over a model, below train/ (it never imports train, cli or Lightning)."""
