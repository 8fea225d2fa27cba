"""Reading weight files safely: safetensors first; pickle formats only when allowed, and weights-only.

``check_weights_file`` is the one gate every model file passes before a library opens it: it decides the
format from the bytes (never the suffix) and checks the file's structure cheaply, so a truncated download
or a damaged header is a one-line ModelError naming the file, not a library traceback.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save as save_numpy

from studio.errors import ModelError, ModelNotFoundError, UnsafeFileError

if TYPE_CHECKING:  # torch loads with the first torch weights (load_weights, torch tensors to save)
    import torch

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFE_SUFFIXES = (".safetensors",)
ONNX_SUFFIXES = (".onnx",)

WeightsFormat = Literal["safetensors", "pickle", "onnx", "diffusers"]

MAX_HEADER = 100_000_000  # bytes; real safetensors headers are kilobytes to a few megabytes
# Bits per element of every safetensors dtype (the Rust crate's Dtype plus the torch FNUZ variants).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}  # fmt: skip
_DOWNLOAD_AGAIN = "download it again, or export it again from its source."
_ONNX_FIELDS = {1: "ir_version", 7: "graph", 8: "opset_import"}  # ModelProto fields every model has


def safetensors_metadata(data: bytes) -> dict[str, str] | None:
    """The ``__metadata__`` of safetensors bytes ({} if none); None when no JSON header is readable."""
    length = int.from_bytes(data[:8], "little")  # safetensors: u64 LE header length, then a JSON header
    try:
        header = json.loads(data[8 : 8 + length]) if 0 < length <= len(data) - 8 else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    return (header.get("__metadata__") or {}) if isinstance(header, dict) else None


def safetensors_bytes(tensors: Mapping[str, torch.Tensor | np.ndarray], metadata: dict[str, str]) -> bytes:
    """safetensors bytes of torch tensors or numpy arrays, header sorted: equal content, equal files.

    safetensors 0.8 writes its header from a hash map, in an order that changes from call to call.
    """
    if all(isinstance(v, np.ndarray) for v in tensors.values()):  # identity files: no torch needed
        arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}  # numpy save reads raw memory
        data = save_numpy(arrays, metadata=metadata)
    else:
        import torch  # torch tensors given: torch is loaded already
        from safetensors.torch import save as save_torch

        as_torch = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in tensors.items()}
        data = save_torch(as_torch, metadata=metadata)
    size = int.from_bytes(data[:8], "little")  # u64 LE header length, then the JSON header (space padded)
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    if len(header) > size:
        raise ValueError(f"safetensors header re-encoding grew from {size} to {len(header)} bytes")
    return data[:8] + header.ljust(size) + data[8 + size :]


def check_weights_file(path: Path, *, allow_pickle: bool) -> WeightsFormat:
    """Check a model file or diffusers folder before any library opens it; returns the format found."""
    path = Path(path)
    if path.is_dir():
        return _check_folder(path, allow_pickle=allow_pickle)
    size = _file_size(path)
    with open(path, "rb") as handle:
        head = handle.read(16)
    fmt = _sniff(head, path.suffix.lower())
    if fmt == "pickle":
        _check_pickle(path, head, allow_pickle=allow_pickle)
    elif fmt == "safetensors":
        _check_safetensors(path, size)
    elif fmt == "onnx":
        _check_onnx(path, size)
    else:
        raise ModelError(
            f"{path} is not a model format the studio reads (safetensors, torch checkpoint, ONNX or "
            f"diffusers folder); it starts with bytes {head[:8].hex(' ')}.",
            fix="use one of those formats; if the file should be one, " + _DOWNLOAD_AGAIN,
        )
    return fmt


def load_weights(path: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """A state dict from ``path``: safetensors, or ``torch.load(weights_only=True)`` when allowed."""
    fmt = check_weights_file(path, allow_pickle=allow_pickle)
    if fmt not in ("safetensors", "pickle"):
        raise ModelError(f"{path} is a {fmt} model, not a weights file.", fix="pass a .safetensors file.")
    import torch  # torch loads here, with the first weights file
    from safetensors.torch import load_file

    try:
        if fmt == "safetensors":
            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeFileError(
            f"{Path(path).name} holds objects other than tensors; weights-only loading refused it "
            "and it was not unpickled.",
            fix="use a .safetensors version of it.",
        ) from err
    except (SafetensorError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{path} cannot be read as {fmt}: {reason}.", fix=_DOWNLOAD_AGAIN) from err
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def _sniff(head: bytes, suffix: str) -> WeightsFormat | None:
    """The format the first bytes show; the suffix only names what a damaged file was meant to be."""
    if head[:4] == b"PK\x03\x04" or (
        head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    ):
        return "pickle"  # torch zip checkpoint, or a legacy torch / plain pickle (PROTO opcode)
    if head[8:9] == b"{":
        return "safetensors"  # u64 LE header length, then the JSON header
    if head[:1] == b"\x08":
        return "onnx"  # protobuf ModelProto: field 1 (ir_version), varint, comes first
    if suffix in SAFE_SUFFIXES:
        return "safetensors"
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    return None


def _file_size(path: Path) -> int:
    try:
        size = path.stat().st_size
    except FileNotFoundError as err:
        raise ModelNotFoundError(f"Model file {path} does not exist.", fix="check the path.") from err
    except OSError as err:
        raise ModelError(
            f"Model file {path} cannot be read: {err.strerror}.", fix="check its permissions."
        ) from err
    if size == 0:
        raise ModelError(f"{path} is empty (0 bytes).", fix=_DOWNLOAD_AGAIN)
    return size


def _check_folder(path: Path, *, allow_pickle: bool) -> WeightsFormat:
    """A diffusers pipeline (model_index.json) or component (config.json) folder and its safetensors."""
    index = next((path / n for n in ("model_index.json", "config.json") if (path / n).is_file()), None)
    if index is None:
        raise ModelError(
            f"{path} is a folder but not a diffusers model: it has no model_index.json or config.json.",
            fix="point at the model file, or at a complete diffusers folder.",
        )
    try:
        parsed = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{index} is not valid JSON ({err}).", fix=_DOWNLOAD_AGAIN) from err
    if not isinstance(parsed, dict):
        raise ModelError(f"{index} is not a JSON object.", fix=_DOWNLOAD_AGAIN)
    for member in sorted(path.rglob("*.safetensors")):
        check_weights_file(member, allow_pickle=allow_pickle)
    return "diffusers"


def _check_pickle(path: Path, head: bytes, *, allow_pickle: bool) -> None:
    """Refuse pickles unless allowed; a zip checkpoint must open and list a data.pkl (no extraction)."""
    suffix = path.suffix.lower()
    if not allow_pickle:
        what = (
            suffix
            if suffix in PICKLE_SUFFIXES
            else f"a torch checkpoint despite its {suffix or 'missing'} suffix"
        )
        raise UnsafeFileError(
            f"{path.name} is a pickle file ({what}); pickles can run code when loaded.",
            fix="use a .safetensors version, or set models.allow_pickle = true to load it weights-only "
            "(tensors only, no code).",
        )
    logger.warning("%s is a pickle format: loading it weights-only (models.allow_pickle = true)", path)
    if head[:4] != b"PK\x03\x04":
        return  # a legacy pickle has no structure to check without unpickling it
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ModelError(f"{path} is a damaged torch checkpoint (zip: {err}).", fix=_DOWNLOAD_AGAIN) from err
    if not any(name.endswith("data.pkl") for name in names):
        raise ModelError(
            f"{path} is a zip file but not a torch checkpoint (no data.pkl).", fix=_DOWNLOAD_AGAIN
        )


def _check_safetensors(path: Path, size: int) -> None:
    """Bounded header, JSON object, known dtypes, offsets that match shapes and cover the data exactly."""
    length, header = _read_header(path, size)
    data = size - 8 - length
    end = _check_tensors(path, header)
    if end > data:
        raise _damaged(path, f"truncated: tensors end at byte {8 + length + end}, file has {size}")
    if end < data:
        raise _damaged(
            path, f"{data - end} bytes of trailing data after the last tensor (byte {8 + length + end})"
        )


def _read_header(path: Path, size: int) -> tuple[int, dict[str, object]]:
    if size < 8:
        raise _damaged(path, f"truncated: {size} bytes is shorter than the 8-byte safetensors header length")
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")  # u64 LE header length
        if length > size - 8:
            raise _damaged(path, f"header claims {_human(length)} but the file is {_human(size)}")
        if length > MAX_HEADER:
            raise _damaged(path, f"header claims {_human(length)}, over the {_human(MAX_HEADER)} limit")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(path, f"the safetensors header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise _damaged(path, f"the safetensors header is a JSON {type(header).__name__}, not an object")
    return length, header


def _check_tensors(path: Path, header: dict[str, object]) -> int:
    """The end offset of the tensor data; tensors must follow each other with no gap or overlap."""
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise _damaged(path, "the safetensors __metadata__ is not a JSON object")
            continue
        spans.append((*_tensor_span(path, name, info), name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise _damaged(
                path, f"tensor {name!r} starts at data byte {begin}, expected {end} (gap or overlap)"
            )
        end = stop
    return end


def _tensor_span(path: Path, name: str, info: object) -> tuple[int, int]:
    """(begin, end) of one tensor's bytes, checked against its dtype and shape."""
    info = info if isinstance(info, dict) else {}
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise _damaged(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _damaged(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _damaged(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        raise _damaged(
            path,
            f"tensor {name!r} ({dtype} {shape}) needs {bits / 8:g} bytes but its data_offsets "
            f"span {offsets[1] - offsets[0]}",
        )
    return offsets[0], offsets[1]


def _check_onnx(path: Path, size: int) -> None:
    """Walk the top-level protobuf records (skipping their bodies): they must end exactly at end of file."""
    seen: set[int] = set()
    with open(path, "rb") as handle:
        pos = 0
        while pos < size:
            start = pos
            tag, pos = _varint(handle, pos, path)
            field, wire = tag >> 3, tag & 7
            if field == 0 or wire not in (0, 1, 2, 5):
                raise _damaged(
                    path, f"not an ONNX protobuf at byte {start} (field {field}, wire type {wire})"
                )
            if wire == 0:
                _, pos = _varint(handle, pos, path)
            elif wire == 2:
                length, pos = _varint(handle, pos, path)
                pos += length
            else:
                pos += 8 if wire == 1 else 4
            if pos > size:
                raise _damaged(
                    path, f"truncated: the ONNX record at byte {start} ends at byte {pos}, file has {size}"
                )
            seen.add(field)
    missing = [name for field, name in _ONNX_FIELDS.items() if field not in seen]
    if missing:
        raise _damaged(path, f"the ONNX model has no {', '.join(missing)} (truncated?)")


def _varint(handle: BinaryIO, pos: int, path: Path) -> tuple[int, int]:
    """A protobuf varint at ``pos``: (value, position after it)."""
    handle.seek(pos)
    data = handle.read(10)
    value = 0
    for i, byte in enumerate(data):
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return value, pos + i + 1
    if len(data) < 10:
        raise _damaged(path, f"truncated: a protobuf varint at byte {pos} runs past the end of the file")
    raise _damaged(path, f"not an ONNX protobuf: the varint at byte {pos} is longer than 10 bytes")


def _damaged(path: Path, problem: str) -> ModelError:
    return ModelError(f"{path} is damaged: {problem}.", fix=_DOWNLOAD_AGAIN)


def _human(size: int) -> str:
    """A byte count for people: 812 B, 1.2 kB, 4.0 GB."""
    if size < 1000:
        return f"{size} B"
    value = float(size)
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if value < 1000 or unit == "PB":
            break
    return f"{value:.1f} {unit}"
