"""Draft stage: a text prompt becomes pictures with Stable Diffusion. One public entry: ``render_draft``.

Image ``k`` of a request uses seed ``seed + k`` and is rendered in batch ``k // batch_size``; a recipe
records the batch it was in, which is what makes ``studio reproduce`` bit-identical.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from studio.config import StudioConfig
from studio.draft.face import FaceCondition, face_call_kwargs, prepare_face
from studio.draft.load import BaseModel, load_pipeline, resolve_base
from studio.draft.loras import ResolvedLora, apply_loras
from studio.draft.schedulers import make_scheduler
from studio.errors import InputError
from studio.imageio import from_pil, to_pil
from studio.models.cache import ModelCache
from studio.models.catalogue import Catalogue, ModelEntry
from studio.prompts import encode_prompts
from studio.types import ImageBGR, ImageRGB, Sampler

logger = logging.getLogger(__name__)

MAX_SIDE = 4096


@dataclass(frozen=True, eq=False)
class ControlSpec:
    """ControlNet pose conditioning: the skeleton image and how strongly / when it steers."""

    model: ModelEntry
    image: ImageRGB  # HxWx3 uint8 RGB skeleton at the draft size
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True, eq=False)
class DraftRequest:
    """Everything that decides a draft (the prompt is final: style and template already applied)."""

    prompt: str
    negative: str
    seed: int
    count: int
    width: int
    height: int
    steps: int
    cfg: float
    sampler: Sampler
    batch_size: int = 1
    loras: tuple[tuple[ResolvedLora, float], ...] = ()
    init_image: ImageBGR | None = None  # img2img: re-draft this picture
    strength: float = 0.75
    control: ControlSpec | None = None
    face: FaceCondition | None = None  # identity-conditioned draft (FACT or IP-Adapter-FaceID)


def plan_batches(count: int, batch_size: int, seed: int) -> tuple[tuple[int, ...], ...]:
    """Seeds grouped into batches: (seed, seed+1, ...) in chunks of ``batch_size``."""
    seeds = [seed + k for k in range(count)]
    return tuple(tuple(seeds[i : i + batch_size]) for i in range(0, count, batch_size))


def prepare_draft(model_ref: str, catalogue: Catalogue, config: StudioConfig, cache: ModelCache) -> BaseModel:
    """Resolve and load the base model ahead of rendering (so load time is reported apart)."""
    base = resolve_base(model_ref, catalogue, config)
    load_pipeline(base, "txt2img", None, config, cache)
    return base


def render_draft(
    request: DraftRequest, base: BaseModel, config: StudioConfig, cache: ModelCache
) -> Iterator[tuple[int, ImageBGR]]:
    """Render the request batch by batch, yielding (seed, image) as each batch finishes."""
    # 1. check inputs
    _check(request)
    # 2. the pipeline variant, with this request's scheduler and LoRAs
    variant = "img2img" if request.init_image is not None else "txt2img"
    control = request.control
    pipe = load_pipeline(base, variant, control.model if control else None, config, cache)
    pipe.scheduler = make_scheduler(request.sampler, pipe.scheduler.config)
    prepared = prepare_face(pipe, request.face, base.family, config, cache)
    apply_loras(pipe, request.loras, config, cache, keep_active=prepared.keep_active)
    _vae_tiling(pipe, config, request.width * request.height)
    # 3. one batch at a time; one CPU generator per image, so image k depends only on seed + k
    for seeds in plan_batches(request.count, request.batch_size, request.seed):
        face = face_call_kwargs(pipe, request.face, prepared, batch=len(seeds), cfg=request.cfg > 1.0)
        images = _forward_batch(pipe, request, seeds, variant, face)
        yield from zip(seeds, (from_pil(image) for image in images), strict=True)


def _forward_batch(
    pipe: object, request: DraftRequest, seeds: tuple[int, ...], variant: str, face: dict[str, object]
) -> list[Image.Image]:
    n = len(seeds)
    embeds = encode_prompts(pipe, [request.prompt] * n, [request.negative] * n)
    kwargs: dict[str, object] = {
        **embeds.as_pipeline_kwargs(),
        "num_inference_steps": request.steps,
        "guidance_scale": request.cfg,
        "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
        **face,
    }
    if variant == "img2img":
        kwargs |= {"image": [_init_image(request)] * n, "strength": request.strength}
    else:
        kwargs |= {"width": request.width, "height": request.height}
    if request.control is not None:
        control = request.control
        key = "control_image" if variant == "img2img" else "image"
        kwargs |= {
            key: [Image.fromarray(control.image)] * n,
            "controlnet_conditioning_scale": control.scale,
            "control_guidance_start": control.start,
            "control_guidance_end": control.end,
        }
    return pipe(**kwargs).images  # type: ignore[operator]


def _init_image(request: DraftRequest) -> Image.Image:
    image = to_pil(request.init_image)  # type: ignore[arg-type]
    if image.size != (request.width, request.height):
        image = image.resize((request.width, request.height), Image.Resampling.LANCZOS)
    return image


def _vae_tiling(pipe: object, config: StudioConfig, pixels: int) -> None:
    toggle = config.performance.vae_tiling
    if toggle == "on" or (toggle == "auto" and pixels > 2_000_000):
        pipe.vae.enable_tiling()  # type: ignore[attr-defined]
    else:
        pipe.vae.disable_tiling()  # type: ignore[attr-defined]


def _check(request: DraftRequest) -> None:
    for name, value in (("width", request.width), ("height", request.height)):
        if value % 8 or not 64 <= value <= MAX_SIDE:
            nearest = max(64, min(MAX_SIDE, round(value / 8) * 8))
            raise InputError(
                f"{name} {value} is not allowed: it must be a multiple of 8 from 64 to {MAX_SIDE}.",
                fix=f"use {nearest}.",
            )
    if not 0.0 < request.strength <= 1.0:
        raise InputError(
            f"strength {request.strength} is outside (0, 1].", fix="use e.g. 0.6 for a re-draft."
        )
    if request.init_image is not None and int(request.steps * request.strength) < 1:
        raise InputError(
            f"strength {request.strength} with {request.steps} steps runs no denoising step "
            "(img2img runs steps x strength of them).",
            fix=f"raise --steps to at least {int(1 / request.strength) + 1} or raise --strength.",
        )
    if not 1 <= request.batch_size <= 16 or request.count < 1:
        raise InputError(
            f"batch size {request.batch_size} / count {request.count} out of range.",
            fix="use a batch size from 1 to 16 and a count of at least 1.",
        )
    control = request.control
    if control is not None and not 0.0 <= control.start < control.end <= 1.0:
        raise InputError(
            f"ControlNet start {control.start} / end {control.end} are not 0 <= start < end <= 1.",
            fix="e.g. --control-start 0 --control-end 0.8.",
        )
    if control is not None and control.image.shape[:2] != (request.height, request.width):
        raise InputError("the pose image does not match the draft size.", fix="load it at the draft size.")


__all__ = ["ControlSpec", "DraftRequest", "plan_batches", "prepare_draft", "render_draft"]
