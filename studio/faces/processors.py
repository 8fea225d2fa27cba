"""Face processors: what the refine stage does to each assigned face, one processor after another.

A processor has one small interface: the models it needs (``models``: role -> config reference and kind,
checked and licence-applied by the caller before any work), ``load`` (once per process: the cache keeps
its sessions), and ``process`` — the aligned crops of one picture's faces (each cut with the processor's
own template and side) in, the processed crops out, possibly larger (an upscaled face). The stage cuts,
masks and pastes; a processor never touches the canvas. Adding one means a class and a ``PROCESSORS``
entry here, nothing in another processor. ``refine.processors`` (or a request's ``processors``) orders them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from studio.config import ProcessorName, RefineConfig, StudioConfig, Toggle
from studio.faces.enhance import FaceEnhancer
from studio.faces.loading import load_face_model, load_onnx_model, load_upscaler_model
from studio.faces.swap import Swapper, cached_latent, swap_aligned, swap_size, wants_upscale
from studio.faces.upscale import Upscaler
from studio.geometry import AlignTemplate
from studio.models.cache import ModelCache
from studio.models.resolve import ResolvedModel
from studio.types import Face, Identity, ImageBGR, ModelKind

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaceJob:
    """One assigned face of a picture: its index (detection order), the face, the identity it becomes."""

    index: int
    face: Face
    identity: Identity


class FaceProcessor(Protocol):
    """A loaded processor: how its crops are cut and pasted, and ``process``."""

    name: ProcessorName
    template: AlignTemplate  # the 5-point template its crops are aligned to
    size: int  # px side of the crops it reads
    colour_match: bool  # paste with the target's skin colour (Reinhard transfer)
    strength: float  # 1: the processed face replaces the crop's; less mixes it with the canvas

    def process(self, crops: Sequence[ImageBGR], jobs: Sequence[FaceJob]) -> list[ImageBGR]:
        """The processed crops (HxWx3 uint8 BGR, square, side ``size`` or a multiple), in ``jobs`` order."""
        ...


Roles = dict[str, tuple[str, ModelKind]]  # role -> (config reference, catalogue kind)
Loader = Callable[[Mapping[str, ResolvedModel], StudioConfig, RefineConfig, ModelCache], FaceProcessor]


@dataclass(frozen=True)
class ProcessorKind:
    """How a processor is set up: the models it needs under ``settings``, and its loader."""

    models: Callable[[RefineConfig], Roles]
    load: Loader


# --- swap: inswapper, then Real-ESRGAN on the swapped crop -------------------------------------------


@dataclass(frozen=True, eq=False)
class SwapProcessor:
    """inswapper_128 on the ArcFace-aligned 128-px crop; the swapped crops Real-ESRGAN-upscaled (one batch
    per crop size) when ``upscale`` says so. The graph has a fixed batch of 1: one call per face."""

    swapper: Swapper
    upscaler: Upscaler | None
    upscale: Toggle
    colour_match: bool
    cache: ModelCache
    name: ProcessorName = "swap"
    template: AlignTemplate = "arcface"
    strength: float = 1.0

    @property
    def size(self) -> int:
        return swap_size(self.swapper)

    def process(self, crops: Sequence[ImageBGR], jobs: Sequence[FaceJob]) -> list[ImageBGR]:
        swapped = [
            swap_aligned(crop, self._latent(job.identity), self.swapper)
            for crop, job in zip(crops, jobs, strict=True)
        ]
        chosen = [
            i for i, job in enumerate(jobs) if wants_upscale(self.upscale, job.face, self.size, self.upscaler)
        ]
        if chosen and self.upscaler is not None:
            for index, big in zip(
                chosen, self.upscaler.upscale_many([swapped[i] for i in chosen]), strict=True
            ):
                swapped[index] = big
        return swapped

    def _latent(self, identity: Identity) -> np.ndarray:
        digest = hashlib.sha256(np.ascontiguousarray(identity.embedding, dtype=np.float32).tobytes())
        key = f"{identity.name}:{digest.hexdigest()[:16]}"  # a re-enrolled identity gets a fresh latent
        return cached_latent(self.cache, key, identity.embedding, self.swapper)


def _swap_models(settings: RefineConfig) -> Roles:
    roles: Roles = {"swapper": (settings.swapper, "swapper")}
    if settings.upscale != "off":
        roles["upscaler"] = (settings.upscaler, "upscaler")
    return roles


def _load_swap(
    models: Mapping[str, ResolvedModel], config: StudioConfig, settings: RefineConfig, cache: ModelCache
) -> SwapProcessor:
    upscaler = load_upscaler_model(models["upscaler"], config, cache) if "upscaler" in models else None
    swapper = load_face_model(models["swapper"], config, cache)
    return SwapProcessor(swapper, upscaler, settings.upscale, settings.colour_match, cache)


# --- enhance: GFPGAN / CodeFormer on the FFHQ-aligned 512-px crop ------------------------------------


@dataclass(frozen=True, eq=False)
class EnhanceProcessor:
    """A face enhancer on each (already swapped) face, blended in at ``strength`` (refine.enhance.blend)."""

    enhancer: FaceEnhancer
    strength: float
    name: ProcessorName = "enhance"
    template: AlignTemplate = "ffhq"
    colour_match: bool = False

    @property
    def size(self) -> int:
        return self.enhancer.size

    def process(self, crops: Sequence[ImageBGR], jobs: Sequence[FaceJob]) -> list[ImageBGR]:
        return [self.enhancer.enhance(crop) for crop in crops]  # FaceFusion's graphs: a fixed batch of 1


def _load_enhance(
    models: Mapping[str, ResolvedModel], config: StudioConfig, settings: RefineConfig, cache: ModelCache
) -> EnhanceProcessor:
    model = models["enhancer"]
    session = load_onnx_model(model, config, cache)
    enhancer = FaceEnhancer.load(model.entry, model.path, session, settings.enhance.fidelity)
    return EnhanceProcessor(enhancer, settings.enhance.blend)


PROCESSORS: Mapping[ProcessorName, ProcessorKind] = {
    "swap": ProcessorKind(_swap_models, _load_swap),
    "enhance": ProcessorKind(lambda s: {"enhancer": (s.enhance.model, "enhancer")}, _load_enhance),
}
