"""Draft stage: a text prompt becomes pictures with Stable Diffusion.

One public entry: a :class:`DraftPipeline` per base model (``open_draft_pipeline``), whose ``render``
yields ``(seed, image)`` batch by batch. Image ``k`` of a request uses seed ``seed + k`` and is rendered in
batch ``k // batch_size``; a recipe records the batch it was in, which is what makes reproduction exact.
The request records (``studio.draft.request``) are light; diffusers is imported with the first pipeline.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from studio.draft.base import BaseModel
from studio.draft.request import ControlSpec, DraftRequest, FaceCondition, Progress, plan_batches

if TYPE_CHECKING:
    from studio.config import StudioConfig
    from studio.draft.pipeline import DraftPipeline
    from studio.models.cache import ModelCache
    from studio.models.catalogue import Catalogue

_LAZY = {"DraftPipeline": "studio.draft.pipeline"}


def open_draft_pipeline(
    model_ref: str, catalogue: Catalogue, config: StudioConfig, cache: ModelCache
) -> DraftPipeline:
    """The DraftPipeline of base model ``model_ref`` (resolved, licence-checked, loaded once per cache)."""
    from studio.draft.base import resolve_base

    base = resolve_base(model_ref, catalogue, config)  # a bad reference fails before diffusers loads
    from studio.draft.pipeline import DraftPipeline

    # everything the pipeline keeps from its config is in the key: a Studio under another config (a
    # recipe's, in reproduce) sharing this cache gets a pipeline that renders as that config says
    kept = (config.draft.max_loaded_loras, config.models.allow_pickle, config.models.dir)
    key = ("draft-pipeline", base.location, base.sha256, config.runtime, config.performance, kept)
    return cache.get(key, lambda: DraftPipeline(base, config, cache))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'studio.draft' has no attribute {name!r}")


__all__ = [
    "BaseModel",
    "ControlSpec",
    "DraftPipeline",
    "DraftRequest",
    "FaceCondition",
    "Progress",
    "open_draft_pipeline",
    "plan_batches",
]
