"""Draft stage: a text prompt becomes pictures with Stable Diffusion.

One public entry: a :class:`DraftPipeline` per base model (``open_draft_pipeline``), whose ``render``
yields ``(seed, image)`` batch by batch. Image ``k`` of a request uses seed ``seed + k`` and is rendered in
batch ``k // batch_size``; a recipe records the batch it was in, which is what makes reproduction exact.
"""

from __future__ import annotations

from studio.config import StudioConfig
from studio.draft.load import BaseModel, resolve_base
from studio.draft.pipeline import DraftPipeline, Progress
from studio.draft.request import ControlSpec, DraftRequest, plan_batches
from studio.models.cache import ModelCache
from studio.models.catalogue import Catalogue


def open_draft_pipeline(
    model_ref: str, catalogue: Catalogue, config: StudioConfig, cache: ModelCache
) -> DraftPipeline:
    """The DraftPipeline of base model ``model_ref`` (resolved, licence-checked, loaded once per cache)."""
    base = resolve_base(model_ref, catalogue, config)
    key = ("draft-pipeline", base.location, base.sha256, config.runtime.device, config.runtime.dtype)
    return cache.get(key, lambda: DraftPipeline(base, config, cache))


__all__ = [
    "BaseModel",
    "ControlSpec",
    "DraftPipeline",
    "DraftRequest",
    "Progress",
    "open_draft_pipeline",
    "plan_batches",
]
