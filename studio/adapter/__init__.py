"""FACT face adapter: face tokens -> Perceiver resampler -> serial gated attention in every UNet block.

Usage (inference)::

    adapter = load_adapter(path, base_family="sd15", encoder_sha256=sha, unet=pipe.unet)  # weights.py
    attach(adapter, pipe.unet)
    kwargs = adapter.face_kwargs(tokens, embedding, scale=0.8, cfg=guidance_scale > 1)
    pipe(prompt, cross_attention_kwargs=kwargs)
    detach(pipe.unet)  # the UNet is the base model again

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
