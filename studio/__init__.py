"""Portrait Studio."""
