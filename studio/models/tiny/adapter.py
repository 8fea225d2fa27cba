"""A tiny FACT adapter fixture for the tiny kit: random weights with its gates opened, so it visibly steers.

The kit is the one place that builds assets for every layer, so this module reaches up into
``studio.adapter`` (imported inside the function to keep ``studio.models`` importable on its own).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from studio.files import sha256_file

logger = logging.getLogger(__name__)

GATE = 0.5  # alpha of every fuser: tanh(0.5) = 0.46 of the attention increment gets through


def write_fact_fixture(path: Path, sd_folder: Path, recognizer: Path, *, seed: int = 0) -> None:
    """Build and save a seeded FACT adapter for the tiny SD 1.5 UNet and the tiny recognizer."""
    from diffusers import UNet2DConditionModel

    from studio.adapter import build_adapter
    from studio.adapter.tokens import FaceTokenEncoder
    from studio.adapter.weights import save_adapter

    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet", local_files_only=True)
    shape = FaceTokenEncoder(recognizer, ["CPUExecutionProvider"]).token_shape
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        adapter = build_adapter(
            unet,
            base_family="sd15",
            face_encoder="tiny-arcface",
            encoder_sha256=sha256_file(recognizer),
            token_shape=shape,
        )
    with torch.no_grad():
        for fuser in adapter.fusers:
            fuser.alpha.fill_(GATE)
    save_adapter(adapter, path, training_config={"fixture": f"random weights, gates opened to {GATE}"})
    logger.debug("tiny FACT adapter written to %s", path)
