"""Training: the Lightning module, optimizer and schedules, checkpoints, callbacks, run assembly."""
