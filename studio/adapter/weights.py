"""Face-adapter files: safetensors tensors plus string metadata that say what the adapter fits.

Metadata (all strings): ``format`` "portrait-studio-fact-adapter", ``format_version``, ``base_family``,
``face_encoder``, ``encoder_sha256``, ``token_shape`` "TxC", ``num_queries``, ``cross_attention_dim``,
``block_dims`` (JSON list), ``heads``, ``depth`` and ``training_config`` (JSON object, "{}" if none).
Tensors are the ``FaceAdapter`` state dict (``resampler.*``, ``fusers.<i>.*``). Files are written
atomically; loading reads the header first and refuses a file made for another base family, face
encoder or UNet before any tensor is read. Pickles are never loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from studio.adapter.fact import BASE_FAMILIES, AdapterSpec, FaceAdapter, check_fits
from studio.errors import AdapterError
from studio.files import write_bytes_atomic
from studio.models.weights import safetensors_bytes

logger = logging.getLogger(__name__)

ADAPTER_FORMAT = "portrait-studio-fact-adapter"
FORMAT_VERSIONS = (1,)
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_MAX_HEADER_BYTES = 16 << 20  # a safetensors JSON header larger than this is not an adapter file
_TRAIN_HINT = "train one for this base model with train_adapter.py"


def save_adapter(
    adapter: FaceAdapter, path: Path, *, training_config: Mapping[str, Any] | None = None
) -> None:
    """Write ``adapter`` to ``path`` (safetensors, atomic), with its spec and training config as metadata."""
    spec = adapter.spec
    tensors = {key: value.detach().cpu().contiguous() for key, value in adapter.state_dict().items()}
    metadata = {
        "format": ADAPTER_FORMAT,
        "format_version": str(spec.format_version),
        "base_family": spec.base_family,
        "face_encoder": spec.face_encoder,
        "encoder_sha256": spec.encoder_sha256,
        "token_shape": f"{spec.token_shape[0]}x{spec.token_shape[1]}",
        "num_queries": str(spec.num_queries),
        "cross_attention_dim": str(spec.cross_attention_dim),
        "block_dims": json.dumps(list(spec.block_dims)),
        "heads": str(spec.heads),
        "depth": str(spec.depth),
        "training_config": json.dumps(dict(training_config or {}), sort_keys=True, default=str),
    }
    write_bytes_atomic(Path(path), safetensors_bytes(tensors, metadata))
    logger.info("saved face adapter (%s, %d tensors) to %s", spec.base_family, len(tensors), path)


def read_adapter_spec(path: Path) -> AdapterSpec:
    """The AdapterSpec in a file's metadata (no tensor is read)."""
    return _spec_from_metadata(path, _read_metadata(Path(path)))


def read_training_config(path: Path) -> dict[str, Any]:
    """The training config stored in an adapter file ({} when none was stored)."""
    meta = _read_metadata(Path(path))
    try:
        config = json.loads(meta.get("training_config") or "{}")
    except json.JSONDecodeError as err:
        raise _bad_file(path, f"training_config is not JSON ({err})") from err
    return config if isinstance(config, dict) else {}


def load_adapter(path: Path, *, base_family: str, encoder_sha256: str, unet: nn.Module) -> FaceAdapter:
    """The adapter in ``path``, checked against base family, encoder and ``unet``; on its device/dtype."""
    # 1. the header: format, version, base family, encoder and widths, before any tensor is read
    path = Path(path)
    spec = read_adapter_spec(path)
    if spec.base_family != base_family:
        raise AdapterError(
            f"Face adapter {path.name} was trained for {spec.base_family}, "
            f"but the base model is {base_family}.",
            fix=f"use a {base_family} face adapter, or {_TRAIN_HINT}.",
        )
    if spec.encoder_sha256 != encoder_sha256:
        raise AdapterError(
            f"Face adapter {path.name} reads tokens of face encoder {spec.face_encoder} "
            f"(sha256 {spec.encoder_sha256[:12]}…), but the studio's recognizer is {encoder_sha256[:12]}…; "
            "tokens of another encoder mean nothing to it.",
            fix=f"set refine.recognizer to {spec.face_encoder}, or {_TRAIN_HINT} and this recognizer.",
        )
    check_fits(spec, unet)
    # 2. the tensors: exactly the adapter's names and shapes
    adapter = FaceAdapter(spec)
    tensors = _read_tensors(path)
    _check_tensors(path, tensors, adapter.state_dict())
    adapter.load_state_dict(tensors, strict=True)
    # 3. ready for inference next to the UNet
    adapter.to(device=unet.device, dtype=unet.dtype).eval()  # to resume training: adapter.float().train()
    logger.info("loaded face adapter %s (%s, encoder %s)", path.name, spec.base_family, spec.face_encoder)
    return adapter


def _bad_file(path: Path, problem: str) -> AdapterError:
    """AdapterError for a damaged or foreign adapter file."""
    return AdapterError(
        f"Face adapter file {path} is invalid: {problem}.",
        fix=f"use a file written by train_adapter.py (format {ADAPTER_FORMAT!r}), or {_TRAIN_HINT}.",
    )


def _read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` of an adapter file, format and version checked."""
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise AdapterError(
            f"Refusing {path}: face adapters are safetensors files; pickles are never loaded.",
            fix="convert the weights to safetensors, or re-export them with train_adapter.py.",
        )
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")  # u64 LE header length, then JSON
            raw = handle.read(length) if 0 < length <= _MAX_HEADER_BYTES else b""
    except OSError as err:
        raise AdapterError(f"Cannot read face adapter {path}: {err}.", fix="check the path.") from err
    try:
        header = json.loads(raw) if len(raw) == length else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise _bad_file(path, "not a safetensors file (no readable header)")
    meta = header.get("__metadata__") or {}
    found = (meta.get("format"), meta.get("format_version"))
    if found[0] != ADAPTER_FORMAT:
        raise _bad_file(path, f"format {found[0]!r}, expected {ADAPTER_FORMAT!r}")
    if found[1] not in {str(v) for v in FORMAT_VERSIONS}:
        raise AdapterError(
            f"Face adapter {path.name} has format version {found[1]!r}; this studio reads "
            f"{', '.join(map(str, FORMAT_VERSIONS))}.",
            fix="update the studio, or re-export the adapter with this version's train_adapter.py.",
        )
    return meta


def _spec_from_metadata(path: Path, meta: dict[str, str]) -> AdapterSpec:
    """Parse the metadata strings into an AdapterSpec; any malformed value names the key."""
    try:
        tokens, width = (int(v) for v in meta["token_shape"].split("x"))
        block_dims = json.loads(meta["block_dims"])
        if not isinstance(block_dims, list) or not all(isinstance(d, int) for d in block_dims):
            raise ValueError(f"block_dims {meta['block_dims'][:80]!r} is not a JSON list of integers")
        if meta["base_family"] not in BASE_FAMILIES:
            raise ValueError(f"base_family {meta['base_family']!r} is not one of {BASE_FAMILIES}")
        return AdapterSpec(
            format_version=int(meta["format_version"]),
            base_family=meta["base_family"],  # type: ignore[arg-type]  # checked just above
            face_encoder=meta["face_encoder"],
            encoder_sha256=meta["encoder_sha256"],
            token_shape=(tokens, width),
            num_queries=int(meta["num_queries"]),
            cross_attention_dim=int(meta["cross_attention_dim"]),
            block_dims=tuple(block_dims),
            heads=int(meta["heads"]),
            depth=int(meta["depth"]),
        )
    except KeyError as err:
        raise _bad_file(path, f"metadata lacks {err.args[0]!r}") from err
    except (ValueError, json.JSONDecodeError) as err:
        raise _bad_file(path, f"malformed metadata ({err})") from err


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (safetensors never executes code)."""
    try:
        return load_safetensors(path.read_bytes())
    except (SafetensorError, OSError, ValueError) as err:
        raise _bad_file(path, f"its tensors cannot be read ({err})") from err


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Raise unless ``tensors`` has exactly the expected names, shapes and finite floating values."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise _bad_file(path, f"tensors missing {missing[:5]}, unexpected {extra[:5]}")
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise _bad_file(
                path, f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            )
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise _bad_file(path, f"tensor {key!r} is not finite floating point ({tensor.dtype})")
