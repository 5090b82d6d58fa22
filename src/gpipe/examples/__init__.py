"""Runnable examples: ``python -m gpipe.examples.<name>``."""
