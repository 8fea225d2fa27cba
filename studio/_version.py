"""The studio's version (its own module, so the lowest layer can read it)."""

__version__ = "0.1.0"
