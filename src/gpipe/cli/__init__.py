"""The ``gpipe`` command: one module per command (``train``, ``launch``, ``plan``, ``run``) over
``base``, the parser whose every error is one line; :func:`main` is the entry point."""

from gpipe.cli.main import main

__all__ = ["main"]
