"""Training machinery: checkpoints, distributed helpers, the trainer and model evaluation."""
