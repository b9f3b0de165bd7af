"""Training: loop, EMA, atomic checkpoints, progress and logs."""
