"""Loading Stable Diffusion pipelines from catalogue entries (single files or diffusers folders)."""

from __future__ import annotations

import logging
import os

import torch
from diffusers import StableDiffusionPipeline

from studio.config import StudioConfig
from studio.models.cache import ModelCache
from studio.models.catalogue import ModelEntry
from studio.models.runtime import choose_device, choose_dtype
from studio.models.store import require_verified

logger = logging.getLogger(__name__)


def load_sd_pipeline(entry: ModelEntry, config: StudioConfig, cache: ModelCache) -> StableDiffusionPipeline:
    """The SD 1.5 pipeline for ``entry``, loaded once per process through ``cache``."""
    device = choose_device(config.runtime.device)
    dtype = choose_dtype(config.runtime, device)
    key = ("sd-pipeline", entry.name, entry.sha256, str(device), str(dtype))
    return cache.get(key, lambda: _load(entry, config, device, dtype))


def _load(
    entry: ModelEntry, config: StudioConfig, device: torch.device, dtype: torch.dtype
) -> StableDiffusionPipeline:
    path = require_verified(entry, config.models)
    offline = entry.source.local is not None or os.environ.get("HF_HUB_OFFLINE") == "1"
    if entry.format == "diffusers":
        pipe = StableDiffusionPipeline.from_pretrained(
            path, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    else:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=entry.config,
            local_files_only=offline,
            torch_dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s from %s on %s (%s)", entry.name, path, device, dtype)
    return pipe.to(device)
