"""Portrait Studio: text prompt → Stable Diffusion draft → face refine.

    from studio import Studio, GenerateRequest, load_config

The names below are imported on first use, so ``import studio`` stays light (no torch until a model loads).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from studio._version import __version__

_EXPORTS = {
    "Studio": "studio.pipeline",
    "Draft": "studio.results",
    "Refined": "studio.results",
    "GenerateRequest": "studio.request",
    "Recipe": "studio.recipe",
    "load_config": "studio.config",
}

if TYPE_CHECKING:
    from studio.config import load_config
    from studio.pipeline import Studio
    from studio.recipe import Recipe
    from studio.request import GenerateRequest
    from studio.results import Draft, Refined


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'studio' has no attribute {name!r}")


__all__ = ["Draft", "GenerateRequest", "Recipe", "Refined", "Studio", "__version__", "load_config"]
