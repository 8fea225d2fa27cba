"""Loading base models for the draft stage (diffusers), and deriving pipeline variants.

Variants (img2img, ControlNet) are built with ``from_pipe`` and share the base pipeline's modules, so
nothing is loaded twice. What a reference *is* (``studio.draft.base``) is decided before this module loads.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import diffusers
import torch
from diffusers import ControlNetModel

from studio.config import PerformanceConfig, StudioConfig
from studio.draft.base import BaseModel, Family, hub_error
from studio.models.cache import ModelCache
from studio.models.resolve import ResolvedModel
from studio.models.runtime import choose_device, choose_dtype

logger = logging.getLogger(__name__)

Variant = Literal["txt2img", "img2img"]
_PIPELINES: dict[tuple[Family, Variant, bool], str] = {
    ("sd15", "txt2img", False): "StableDiffusionPipeline",
    ("sd15", "img2img", False): "StableDiffusionImg2ImgPipeline",
    ("sd15", "txt2img", True): "StableDiffusionControlNetPipeline",
    ("sd15", "img2img", True): "StableDiffusionControlNetImg2ImgPipeline",
    ("sdxl", "txt2img", False): "StableDiffusionXLPipeline",
    ("sdxl", "img2img", False): "StableDiffusionXLImg2ImgPipeline",
    ("sdxl", "txt2img", True): "StableDiffusionXLControlNetPipeline",
    ("sdxl", "img2img", True): "StableDiffusionXLControlNetImg2ImgPipeline",
}


def load_base(base: BaseModel, config: StudioConfig) -> Any:
    """The txt2img pipeline of ``base`` on the configured device, quiet, with the performance options."""
    device = choose_device(config.runtime.device)
    dtype = choose_dtype(config.runtime, device)
    return _load_base(base, config.performance, device, dtype)


def load_variant(
    pipe: Any,
    base: BaseModel,
    variant: Variant,
    control: ResolvedModel | None,
    config: StudioConfig,
    cache: ModelCache,
) -> Any:
    """The pipeline for ``variant`` (with ControlNet ``control``), sharing ``pipe``'s loaded modules."""
    if variant == "txt2img" and control is None:
        return pipe
    cls = getattr(diffusers, _PIPELINES[(base.family, variant, control is not None)])
    extra: dict[str, Any] = {}
    if control is not None:
        device, dtype = pipe.unet.device, pipe.unet.dtype
        key = ("controlnet", control.sha256, str(device), str(dtype))
        extra["controlnet"] = cache.get(key, lambda: _load_controlnet(control, device, dtype))
    variant_pipe = cls.from_pipe(pipe, **extra)
    variant_pipe.set_progress_bar_config(disable=True)  # progress goes to the request's callback
    return variant_pipe


def _load_base(base: BaseModel, perf: PerformanceConfig, device: torch.device, dtype: torch.dtype) -> Any:
    cls = getattr(diffusers, _PIPELINES[(base.family, "txt2img", False)])
    offline = base.source != "hub" or os.environ.get("HF_HUB_OFFLINE") == "1"
    common: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": offline}
    if base.family == "sd15":
        common |= {"safety_checker": None, "requires_safety_checker": False}
    if base.source == "single_file":
        pipe = cls.from_single_file(base.location, config=base.config, **common)
    elif base.source == "hub":
        try:
            pipe = cls.from_pretrained(base.location, **common)
        except (OSError, ValueError) as err:
            raise hub_error(base.location, err) from err
    else:
        pipe = cls.from_pretrained(base.location, **common)
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s (%s, %s) on %s as %s", base.label, base.family, base.source, device, dtype)
    return _apply_performance(pipe, perf, device)


def _load_controlnet(model: ResolvedModel, device: torch.device, dtype: torch.dtype) -> Any:
    if (model.path / "config.json").is_file():
        net = ControlNetModel.from_pretrained(model.path, torch_dtype=dtype, local_files_only=True)
    else:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        config = model.entry.config if model.entry else None
        net = ControlNetModel.from_single_file(
            str(model.path), config=config, torch_dtype=dtype, local_files_only=offline
        )
    return net.to(device)


def _on(toggle: str, auto: bool) -> bool:
    return toggle == "on" or (toggle == "auto" and auto)


def _apply_performance(pipe: Any, perf: PerformanceConfig, device: torch.device) -> Any:
    cuda = device.type == "cuda"
    if _on(perf.vae_slicing, cuda):
        pipe.vae.enable_slicing()
    if _on(perf.attention_slicing, device.type == "mps"):
        pipe.enable_attention_slicing()
    if _on(perf.channels_last, cuda):
        pipe.unet.to(memory_format=torch.channels_last)
    if perf.compile:
        pipe.unet = torch.compile(pipe.unet)
    if perf.cpu_offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif perf.cpu_offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe
