"""Draft stage: a text prompt becomes pictures with Stable Diffusion. One public entry: ``render_draft``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from studio.config import StudioConfig
from studio.draft.load import load_sd_pipeline
from studio.draft.schedulers import make_scheduler
from studio.errors import InputError
from studio.imageio import from_pil
from studio.models.cache import ModelCache
from studio.models.catalogue import ModelEntry
from studio.types import ImageBGR, Sampler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftRequest:
    """Everything that decides a draft; image ``i`` of a request uses seed ``seed + i``."""

    prompt: str
    negative: str
    seed: int
    count: int
    width: int
    height: int
    steps: int
    cfg: float
    sampler: Sampler


def prepare_draft(model: ModelEntry, config: StudioConfig, cache: ModelCache) -> None:
    """Load the draft model into ``cache`` ahead of rendering (so load time can be reported apart)."""
    load_sd_pipeline(model, config, cache)


def render_draft(
    request: DraftRequest, model: ModelEntry, config: StudioConfig, cache: ModelCache
) -> list[ImageBGR]:
    """Render ``request.count`` pictures; each is reproducible from its own seed."""
    # 1. check inputs
    _check_size(request.width, request.height)
    # 2. prepare the pipeline (loaded once per process) and a fresh scheduler for this request
    pipe = load_sd_pipeline(model, config, cache)
    pipe.scheduler = make_scheduler(request.sampler, pipe.scheduler.config)
    # 3. one CPU generator per image: image i depends only on seed + i, on any device
    generators = [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(request.count)]
    result = pipe(
        prompt=[request.prompt] * request.count,
        negative_prompt=[request.negative] * request.count,
        width=request.width,
        height=request.height,
        num_inference_steps=request.steps,
        guidance_scale=request.cfg,
        generator=generators,
    )
    return [from_pil(image) for image in result.images]


def _check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value % 8 or not 64 <= value <= 4096:
            raise InputError(
                f"{name} {value} is not allowed: it must be a multiple of 8 from 64 to 4096.",
                fix=f"use e.g. {max(64, min(4096, value // 8 * 8))}.",
            )
