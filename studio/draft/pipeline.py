"""``DraftPipeline``: one loaded base model and all the mutable diffusers state that goes with it.

diffusers pipelines are stateful: the scheduler, the active LoRA set, attached face adapters and VAE tiling
live on the pipeline object. One ``DraftPipeline`` per loaded base model owns that state and applies a
request's configuration under a lock, batch by batch, so concurrent requests (a web UI, several campaign
items) queue for the model instead of racing on it, and each batch renders exactly as it would alone.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image

from studio.compat import quiet_model_libraries
from studio.config import StudioConfig
from studio.draft.base import BaseModel
from studio.draft.embeds import PromptEncoder
from studio.draft.face import FaceState, face_call_kwargs, prepare_face
from studio.draft.load import Variant, load_base, load_variant
from studio.draft.loras import apply_loras, unload_all
from studio.draft.request import DraftRequest, Progress, check_draft, plan_batches
from studio.draft.schedulers import make_scheduler
from studio.imageio import from_pil, to_pil
from studio.models.cache import ModelCache
from studio.types import ImageBGR

logger = logging.getLogger(__name__)


class DraftPipeline:
    """A loaded base model; renders requests one batch at a time under its lock."""

    def __init__(self, base: BaseModel, config: StudioConfig, cache: ModelCache) -> None:
        self.base = base
        self._config = config
        self._cache = cache
        self._lock = threading.Lock()
        with quiet_model_libraries():
            self._pipe = load_base(base, config)
        self._scheduler_config = self._pipe.scheduler.config  # the model's own, before any sampler change
        self._variants: dict[tuple[Variant, str | None], Any] = {}
        self._loras: OrderedDict[str, None] = OrderedDict()  # resident peft adapters, least recent first
        self._face = FaceState()
        self._prompts = PromptEncoder()  # compel providers and each distinct prompt's embedding, cached

    def render(
        self, request: DraftRequest, progress: Progress | None = None
    ) -> Iterator[tuple[int, ImageBGR]]:
        """Render ``request`` batch by batch, yielding (seed, image) as each batch finishes."""
        # 1. check inputs before taking the model
        check_draft(request)
        batches = plan_batches(request.count, request.batch_size, request.seed)
        per_batch = _denoising_steps(request)
        done = 0
        # 2. each batch: take the model, put it in this request's state, run it; one CPU generator per
        #    image, so image k depends only on seed + k (and on the batch it is rendered in)
        for seeds in batches:
            with self._lock:
                pipe = self._configure(request)
                images = _forward_batch(
                    pipe,
                    self._prompts,
                    request,
                    seeds,
                    self._face_kwargs(pipe, request, len(seeds)),
                    _step_callback(progress, done, per_batch * len(batches)),
                )
            done += per_batch
            yield from zip(seeds, (from_pil(image) for image in images), strict=True)

    @property
    def diffusers_pipeline(self) -> Any:
        """The loaded txt2img diffusers pipeline, for inspection (benchmarks); change it only via render."""
        return self._pipe

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._pipe.unet.device

    def unload_loras(self) -> None:
        """Remove every LoRA (and FaceID) from the model, restoring the base weights exactly."""
        with self._lock:
            unload_all(self._pipe)
            self._loras.clear()
            self._face.faceid, self._face.parked = None, None

    def _configure(self, request: DraftRequest) -> Any:
        """The pipeline variant for ``request`` with its scheduler, face adapter, LoRAs and VAE tiling."""
        with quiet_model_libraries():
            return self._apply(request)

    def _apply(self, request: DraftRequest) -> Any:
        variant: Variant = "img2img" if request.init_image is not None else "txt2img"
        control = request.control.model if request.control else None
        key = (variant, control.sha256 if control else None)
        if key not in self._variants:
            self._variants[key] = load_variant(
                self._pipe, self.base, variant, control, self._config, self._cache
            )
        pipe = self._variants[key]
        pipe.scheduler = make_scheduler(request.sampler, self._scheduler_config)
        keep = prepare_face(pipe, request.face, self.base.family, self._face, self._config)
        apply_loras(pipe, request.loras, self._loras, self._config, keep_active=keep)
        _vae_tiling(pipe, self._config, request.width * request.height)
        return pipe

    def _face_kwargs(self, pipe: Any, request: DraftRequest, batch: int) -> dict[str, Any]:
        return face_call_kwargs(pipe, request.face, self._face, batch=batch, cfg=request.cfg > 1.0)


def _denoising_steps(request: DraftRequest) -> int:
    """UNet steps one batch runs (img2img runs steps x strength of them)."""
    if request.init_image is None:
        return request.steps
    return max(1, int(request.steps * request.strength))


def _step_callback(progress: Progress | None, done: int, total: int) -> dict[str, Any]:
    """diffusers' ``callback_on_step_end`` reporting (steps done, total) to ``progress``."""
    if progress is None:
        return {}

    def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        progress(done + step + 1, total)
        return {}

    return {"callback_on_step_end": on_step}


def _forward_batch(
    pipe: Any,
    prompts: PromptEncoder,
    request: DraftRequest,
    seeds: tuple[int, ...],
    face: dict[str, Any],
    callback: dict[str, Any],
) -> list[Image.Image]:
    n = len(seeds)
    loras = tuple((model.sha256, weight) for model, weight in request.loras)  # may patch the text encoder
    embeds = prompts.encode(pipe, [request.prompt] * n, [request.negative] * n, state=loras)
    kwargs: dict[str, Any] = {
        **embeds.as_pipeline_kwargs(),
        "num_inference_steps": request.steps,
        "guidance_scale": request.cfg,
        "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
        **face,
        **callback,
    }
    img2img = request.init_image is not None
    if img2img:
        kwargs |= {"image": [_init_image(request)] * n, "strength": request.strength}
    else:
        kwargs |= {"width": request.width, "height": request.height}
    if request.control is not None:
        control = request.control
        kwargs |= {
            "control_image" if img2img else "image": [Image.fromarray(control.image)] * n,
            "controlnet_conditioning_scale": control.scale,
            "control_guidance_start": control.start,
            "control_guidance_end": control.end,
        }
    return pipe(**kwargs).images


def _init_image(request: DraftRequest) -> Image.Image:
    image = to_pil(request.init_image)  # type: ignore[arg-type]
    if image.size != (request.width, request.height):
        image = image.resize((request.width, request.height), Image.Resampling.LANCZOS)
    return image


def _vae_tiling(pipe: Any, config: StudioConfig, pixels: int) -> None:
    toggle = config.performance.vae_tiling
    if toggle == "on" or (toggle == "auto" and pixels > 2_000_000):
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()
