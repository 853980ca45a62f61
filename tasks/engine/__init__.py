"""The machinery every task shares: the task registry, the command-line runner, the Python
API's ``Predictor``, config, train / eval loop, loaders, checkpoints, metrics, logging, pictures."""
