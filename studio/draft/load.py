"""Base models for the draft stage: resolve a reference, load it once, derive pipeline variants.

A reference is a catalogue name, a diffusers folder, a single ``.safetensors`` checkpoint (loaded offline
with local component configs) or a Hugging Face repo id. Variants (img2img, ControlNet) are built with
``from_pipe`` and share the base pipeline's modules, so nothing is loaded twice.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
from diffusers import ControlNetModel, DiffusionPipeline
from safetensors import safe_open

from studio.config import PerformanceConfig, StudioConfig
from studio.errors import InputError
from studio.models.cache import ModelCache
from studio.models.catalogue import Catalogue, ModelEntry
from studio.models.resolve import ResolvedModel, resolve
from studio.models.runtime import choose_device, choose_dtype
from studio.models.weights import check_weights_file

logger = logging.getLogger(__name__)

Family = Literal["sd15", "sdxl"]
Variant = Literal["txt2img", "img2img"]
_SDXL_KEY = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
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


@dataclass(frozen=True)
class BaseModel:
    """A resolved draft base model."""

    label: str  # what the user asked for
    family: Family
    source: Literal["single_file", "folder", "hub"]
    location: str  # a path, or a Hugging Face repo id
    config: str | None  # component configs for single files (a folder)
    sha256: str  # of the checkpoint file (folders: tree_sha256); "" for hub repos
    model: ResolvedModel  # what the resolver found: catalogue entry, licence


def resolve_base(ref: str, catalogue: Catalogue, config: StudioConfig) -> BaseModel:
    """Turn a model reference into a BaseModel (through the one resolver: checked, licence applied)."""
    model = resolve(ref, "base", config, catalogue)
    entry = model.entry
    index = model.path / "model_index.json"
    if (entry is not None and entry.format == "diffusers") or index.is_file():
        family = _family(config, entry, lambda: _index_family(json.loads(index.read_text())))
        return BaseModel(ref, family, "folder", model.location, None, model.sha256, model)
    if model.sha256 == "":  # a Hugging Face repo id
        family = _family(config, None, lambda: _index_family(DiffusionPipeline.load_config(ref)))
        return BaseModel(ref, family, "hub", ref, None, "", model)
    family = _family(config, entry, lambda: _single_file_family(model.path))
    own = entry.config if entry and entry.config and Path(entry.config).is_dir() else None
    return BaseModel(
        ref, family, "single_file", model.location, own or _base_config(family, config), model.sha256, model
    )


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


def _base_config(family: Family, config: StudioConfig) -> str:
    """Shipped component configs (configs/base/<family>) so single files load with no network."""
    from studio.draft.base_configs import ensure_base_config

    return str(ensure_base_config(family, config.models.dir / "base-configs"))


def _family(config: StudioConfig, entry: ModelEntry | None, infer: Callable[[], Family]) -> Family:
    if entry is not None:
        return entry.kind  # type: ignore[return-value]  # the catalogue says which family
    if config.draft.family != "auto":
        return config.draft.family
    family = infer()
    logger.info("draft.family = auto: treating the model as %s", family)
    return family


def _single_file_family(path: Path) -> Family:
    if check_weights_file(path, allow_pickle=True) != "safetensors":
        raise InputError(f"Cannot tell whether {path.name} is SD 1.5 or SDXL.", fix="set draft.family.")
    with safe_open(str(path), framework="pt") as handle:
        return "sdxl" if _SDXL_KEY in handle.keys() else "sd15"  # noqa: SIM118  (safe_open is not a dict)


def _index_family(index: dict[str, Any]) -> Family:
    name = str(index.get("_class_name", ""))
    if "XL" in name:
        return "sdxl"
    if name.startswith("StableDiffusion"):
        return "sd15"
    raise InputError(
        f"Model class {name!r} is not Stable Diffusion 1.5 or XL.", fix="pick an SD 1.5/SDXL model."
    )


def _load_base(base: BaseModel, perf: PerformanceConfig, device: torch.device, dtype: torch.dtype) -> Any:
    cls = getattr(diffusers, _PIPELINES[(base.family, "txt2img", False)])
    offline = base.source != "hub" or os.environ.get("HF_HUB_OFFLINE") == "1"
    common: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": offline}
    if base.family == "sd15":
        common |= {"safety_checker": None, "requires_safety_checker": False}
    if base.source == "single_file":
        pipe = cls.from_single_file(base.location, config=base.config, **common)
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
