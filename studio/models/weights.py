"""Reading weight files safely: safetensors first; pickle formats only when allowed, and weights-only."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from studio.errors import UnsafeFileError

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFE_SUFFIXES = (".safetensors",)


def safetensors_bytes(tensors: Mapping[str, torch.Tensor | np.ndarray], metadata: dict[str, str]) -> bytes:
    """safetensors bytes of torch tensors or numpy arrays, header sorted: equal content, equal files.

    safetensors 0.8 writes its header from a hash map, in an order that changes from call to call.
    """
    as_torch = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in tensors.items()}
    data = safetensors.torch.save(as_torch, metadata=metadata)
    size = int.from_bytes(data[:8], "little")  # u64 LE header length, then the JSON header (space padded)
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    if len(header) > size:
        raise ValueError(f"safetensors header re-encoding grew from {size} to {len(header)} bytes")
    return data[:8] + header.ljust(size) + data[8 + size :]


def check_weights_file(path: Path, *, allow_pickle: bool) -> None:
    """Refuse pickle-format files unless the config allows them (they are then loaded weights-only)."""
    suffix = Path(path).suffix.lower()
    if suffix in SAFE_SUFFIXES:
        return
    if suffix in PICKLE_SUFFIXES and allow_pickle:
        logger.warning("%s is a pickle format: loading it weights-only (models.allow_pickle = true)", path)
        return
    if suffix in PICKLE_SUFFIXES:
        raise UnsafeFileError(
            f"{Path(path).name} is a pickle file ({suffix}); pickles can run code when loaded.",
            fix="use a .safetensors version, or set models.allow_pickle = true to load it weights-only "
            "(tensors only, no code).",
        )
    raise UnsafeFileError(
        f"{Path(path).name}: {suffix or 'no extension'} is not a weights format the studio reads.",
        fix=f"use {', '.join(SAFE_SUFFIXES + PICKLE_SUFFIXES)}.",
    )


def load_weights(path: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """A state dict from ``path``: safetensors, or ``torch.load(weights_only=True)`` when allowed."""
    check_weights_file(path, allow_pickle=allow_pickle)
    if Path(path).suffix.lower() in SAFE_SUFFIXES:
        return safetensors.torch.load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state
