"""Training utilities: checkpoints, metrics, distributed helpers, logging, reports."""
