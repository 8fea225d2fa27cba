"""Portrait Studio: text prompt → Stable Diffusion draft → face refine."""

__version__ = "0.1.0"
