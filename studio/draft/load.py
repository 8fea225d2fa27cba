"""Base models for the draft stage: resolve a reference, load it once, derive pipeline variants.

A reference is a catalogue name, a diffusers folder, a single ``.safetensors`` checkpoint (loaded offline
with local component configs) or a Hugging Face repo id. Variants (img2img, ControlNet) are built with
``from_pipe`` and share the base pipeline's modules, so nothing is loaded twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
from diffusers import ControlNetModel, DiffusionPipeline
from safetensors import safe_open

from studio.config import PerformanceConfig, StudioConfig
from studio.errors import InputError, ModelError
from studio.models.cache import ModelCache
from studio.models.catalogue import Catalogue, ModelEntry
from studio.models.runtime import choose_device, choose_dtype
from studio.models.store import file_digest, require_verified
from studio.models.weights import check_weights_file

logger = logging.getLogger(__name__)

Family = Literal["sd15", "sdxl"]
Variant = Literal["txt2img", "img2img"]
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
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
    sha256: str  # of the checkpoint file; "" for folders and hub repos


def resolve_base(ref: str, catalogue: Catalogue, config: StudioConfig) -> BaseModel:
    """Turn a model reference into a BaseModel; a clear error names what was tried."""
    entry = catalogue.get(ref)
    if entry is not None and entry.kind in ("sd15", "sdxl"):
        return _from_entry(entry, config)
    path = Path(ref).expanduser()
    if path.is_file():
        check_weights_file(path, allow_pickle=config.models.allow_pickle)
        family = _family(config, lambda: _single_file_family(path))
        sha = file_digest(path, config.models.dir)
        return BaseModel(ref, family, "single_file", str(path), _base_config(family, config), sha)
    if (path / "model_index.json").is_file():
        family = _family(config, lambda: _index_family(json.loads((path / "model_index.json").read_text())))
        return BaseModel(ref, family, "folder", str(path), None, "")
    if _HUB_ID.match(ref) and not path.exists():
        family = _family(config, lambda: _index_family(DiffusionPipeline.load_config(ref)))
        return BaseModel(ref, family, "hub", ref, None, "")
    known = sorted(n for n, e in catalogue.items() if e.kind in ("sd15", "sdxl"))
    raise ModelError(
        f"Draft model {ref!r} is not a catalogue name, a model file, a diffusers folder or a repo id.",
        fix=f"use one of {', '.join(known)}, a .safetensors path, a diffusers folder, or a repo id org/name.",
    )


def load_pipeline(
    base: BaseModel, variant: Variant, controlnet: ModelEntry | None, config: StudioConfig, cache: ModelCache
) -> DiffusionPipeline:
    """The pipeline for ``variant`` (with ``controlnet`` if given), sharing one loaded base."""
    device = choose_device(config.runtime.device)
    dtype = choose_dtype(config.runtime, device)
    base_key = ("draft-base", base.location, base.family, str(device), str(dtype))
    pipe = cache.get(base_key, lambda: _load_base(base, config.performance, device, dtype))
    if variant == "txt2img" and controlnet is None:
        return pipe
    cls = getattr(diffusers, _PIPELINES[(base.family, variant, controlnet is not None)])
    extra: dict[str, Any] = {}
    if controlnet is not None:
        key = ("controlnet", controlnet.name, str(device), str(dtype))
        extra["controlnet"] = cache.get(key, lambda: _load_controlnet(controlnet, config, device, dtype))
    variant_key = (*base_key, variant, controlnet.name if controlnet else None)
    return cache.get(variant_key, lambda: cls.from_pipe(pipe, **extra))


def _from_entry(entry: ModelEntry, config: StudioConfig) -> BaseModel:
    path = require_verified(entry, config.models)
    family: Family = entry.kind  # type: ignore[assignment]  # the catalogue says which family
    if entry.format == "diffusers":
        return BaseModel(entry.name, family, "folder", str(path), None, entry.sha256)
    local = entry.config if entry.config and Path(entry.config).is_dir() else _base_config(family, config)
    return BaseModel(entry.name, family, "single_file", str(path), local, entry.sha256)


def _base_config(family: Family, config: StudioConfig) -> str:
    """Shipped component configs (configs/base/<family>) so single files load with no network."""
    from studio.draft.base_configs import ensure_base_config

    return str(ensure_base_config(family, config.models.dir / "base-configs"))


def _family(config: StudioConfig, infer: Callable[[], Family]) -> Family:
    if config.draft.family != "auto":
        return config.draft.family
    family = infer()
    logger.info("draft.family = auto: treating the model as %s", family)
    return family


def _single_file_family(path: Path) -> Family:
    if path.suffix.lower() != ".safetensors":
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


def _load_controlnet(
    entry: ModelEntry, config: StudioConfig, device: torch.device, dtype: torch.dtype
) -> Any:
    path = require_verified(entry, config.models)
    if entry.format == "diffusers":
        model = ControlNetModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    else:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        model = ControlNetModel.from_single_file(
            str(path), config=entry.config, torch_dtype=dtype, local_files_only=offline
        )
    return model.to(device)


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
