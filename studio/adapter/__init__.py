"""FACT face adapter (see ``fact.py`` for how it works and how to use it).

The adapter itself lives in ``fact.py`` (torch); its names are re-exported here lazily, so importing a
light submodule (``studio.adapter.tokens``, which the identity library needs) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from studio.adapter.fact import (
        BASE_FAMILIES,
        AdapterSpec,
        BaseFamily,
        FaceAdapter,
        FaceContext,
        attach,
        build_adapter,
        check_fits,
        detach,
        increments,
        set_recording,
    )

__all__ = [
    "BASE_FAMILIES",
    "AdapterSpec",
    "BaseFamily",
    "FaceAdapter",
    "FaceContext",
    "attach",
    "build_adapter",
    "check_fits",
    "detach",
    "increments",
    "set_recording",
]


def __getattr__(name: str) -> Any:
    if name in __all__:  # torch is imported with the first adapter name a caller asks for
        return getattr(importlib.import_module("studio.adapter.fact"), name)
    raise AttributeError(f"module 'studio.adapter' has no attribute {name!r}")
