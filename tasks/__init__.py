"""Command-line tasks (``python -m tasks.classify`` ...) and their shared engine and data."""
