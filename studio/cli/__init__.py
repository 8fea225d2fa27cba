"""The ``studio`` command line: ``main`` is the console entry point."""

from studio.cli.main import app, main

__all__ = ["app", "main"]
