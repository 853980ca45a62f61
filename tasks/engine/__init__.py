"""The engine shared by every task: config, train / eval loop, checkpoints, metrics, logging, pictures."""
