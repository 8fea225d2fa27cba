"""What decides a draft: the final prompt, size, sampler, seeds, LoRAs, pose and face conditioning."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from studio.config import MAX_BATCH, DraftConfig, check_value
from studio.errors import InputError
from studio.models.resolve import ResolvedModel
from studio.types import FaceAdapterKind, Identity, ImageBGR, ImageRGB, Sampler

Progress = Callable[[int, int], None]  # (denoising steps done, steps in the whole request)


@dataclass(frozen=True, eq=False)
class FaceCondition:
    """Which adapter steers the draft toward which identity, and how strongly."""

    kind: FaceAdapterKind
    weights: Path  # the adapter file (FACT safetensors, or the public FaceID .bin / its safetensors)
    weights_sha256: str
    identity: Identity
    scale: float = 0.8
    identity_sha256: str = ""  # the identity file's digest (recipes)


@dataclass(frozen=True, eq=False)
class ControlSpec:
    """ControlNet pose conditioning: the skeleton image and how strongly / when it steers."""

    model: ResolvedModel
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
    loras: tuple[tuple[ResolvedModel, float], ...] = ()
    init_image: ImageBGR | None = None  # img2img: re-draft this picture
    strength: float = 0.75
    control: ControlSpec | None = None
    face: FaceCondition | None = None  # identity-conditioned draft (FACT or IP-Adapter-FaceID)


def plan_batches(count: int, batch_size: int, seed: int) -> tuple[tuple[int, ...], ...]:
    """Seeds grouped into batches: (seed, seed+1, ...) in chunks of ``batch_size``."""
    seeds = [seed + k for k in range(count)]
    return tuple(tuple(seeds[i : i + batch_size]) for i in range(0, count, batch_size))


def check_draft(request: DraftRequest) -> None:
    """Refuse a request the model cannot render, with the allowed values (ranges from DraftConfig)."""
    hints = typing.get_type_hints(DraftConfig)
    for spec in dataclasses.fields(DraftConfig):
        if spec.name in ("width", "height", "steps", "cfg", "sampler"):
            check_value(spec, hints[spec.name], getattr(request, spec.name), f"--{spec.name}")
    if request.init_image is not None and int(request.steps * request.strength) < 1:
        raise InputError(
            f"strength {request.strength} with {request.steps} steps runs no denoising step "
            "(img2img runs steps x strength of them).",
            fix=f"raise --steps to at least {int(1 / request.strength) + 1} or raise --strength.",
        )
    if not 1 <= request.batch_size <= MAX_BATCH or request.count < 1:
        raise InputError(
            f"batch size {request.batch_size} / count {request.count} out of range.",
            fix=f"use a batch size from 1 to {MAX_BATCH} and a count of at least 1.",
        )
    control = request.control
    if control is not None and not 0.0 <= control.start < control.end <= 1.0:
        raise InputError(
            f"ControlNet start {control.start} / end {control.end} are not 0 <= start < end <= 1.",
            fix="e.g. --control-start 0 --control-end 0.8.",
        )
    if control is not None and control.image.shape[:2] != (request.height, request.width):
        raise InputError("the pose image does not match the draft size.", fix="load it at the draft size.")
