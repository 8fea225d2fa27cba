"""The template records and their file format: safetensors arrays + string metadata, validated on load.

A template is a master picture with its detected faces as numbered slots (slot i is the i-th face of the
master in left-to-right order). Tensors: ``boxes`` (N, 4) float32 x1, y1, x2, y2 px; ``landmarks``
(N, 5, 2) float32 x, y px; ``embeddings`` (N, 512) float32, each row L2-normed. Metadata (strings): format,
version, name, image (the master's file name in the library), image_sha256, width, height (the master's
size in px), recognizer_sha256, created (ISO-8601 UTC). Pickles are never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors

from studio.errors import TemplateError
from studio.models.weights import safetensors_bytes, safetensors_metadata
from studio.types import Embedding, Landmark5

ADD_HINT = "add it again with `studio template add NAME IMAGE --replace`"
TEMPLATE_FORMAT = "portrait-studio-template"
TEMPLATE_VERSION = "1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # the master keeps its own format
MASTER_INFIX = ".master"  # the master picture of template NAME is NAME.master<suffix>
MAX_SLOTS = 64
MAX_FILE_BYTES = 4 << 20  # 64 slots take ~140 KiB: anything far larger is not a template file
EMBEDDING_SIZE = 512  # ArcFace's width
_METADATA_KEYS = ("name", "image", "image_sha256", "width", "height", "recognizer_sha256", "created")
_NORM_TOLERANCE = 1e-3


# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Slot:
    """One numbered face of a template's master picture (``0=anna`` names slot 0)."""

    index: int
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in master px
    landmarks: Landmark5 = field(repr=False)  # (5, 2) float32 x, y in master px
    embedding: Embedding = field(repr=False)  # (512,) float32, L2-normed

    @property
    def centre(self) -> tuple[float, float]:
        """The box centre in master px."""
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True, eq=False)
class Template:
    """A master picture and its face slots, as stored in the template library."""

    name: str
    image: str  # the master's file name in the library folder
    image_sha256: str  # of the master's bytes
    width: int  # master size in px (upright, as read)
    height: int
    slots: tuple[Slot, ...]  # slot i has index i
    recognizer_sha256: str  # the recognizer that made the slot embeddings
    created: str  # ISO-8601 UTC
    file_sha256: str = ""  # of the template file, set when loaded or saved


# --- the file ---------------------------------------------------------------------------------


def master_name(name: str, suffix: str) -> str:
    """The library file name of template ``name``'s master picture."""
    return f"{name}{MASTER_INFIX}{suffix.lower()}"


def serialize_template(template: Template) -> bytes:
    """The safetensors bytes of a template file: three float32 tensors and string metadata."""
    slots = template.slots
    tensors = {
        "boxes": np.array([s.box for s in slots], np.float32).reshape(-1, 4),  # (N, 4) x1, y1, x2, y2 px
        "landmarks": np.stack([s.landmarks for s in slots]).astype(np.float32),  # (N, 5, 2) x, y px
        "embeddings": np.stack([s.embedding for s in slots]).astype(np.float32),  # (N, 512) L2-normed
    }
    metadata = {
        "format": TEMPLATE_FORMAT,
        "version": TEMPLATE_VERSION,
        "name": template.name,
        "image": template.image,
        "image_sha256": template.image_sha256,
        "width": str(template.width),
        "height": str(template.height),
        "recognizer_sha256": template.recognizer_sha256,
        "created": template.created,
    }
    return safetensors_bytes(tensors, metadata)


def bad_template_file(path: Path, problem: str) -> TemplateError:
    """TemplateError for a damaged or foreign template file."""
    return TemplateError(f"Template file {path} is invalid: {problem}.", fix=f"remove it and {ADD_HINT}.")


def parse_template_file(path: Path, name: str, data: bytes) -> Template:
    """Validate a template file's bytes: format, metadata, shapes, dtypes, finiteness, unit norms."""
    # 1. container and metadata
    meta = _read_metadata(path, data)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, TypeError) as err:
        raise bad_template_file(path, f"not a readable safetensors file ({err})") from err
    if meta["name"] != name:
        raise bad_template_file(path, f"it holds template {meta['name']!r}, not {name!r} (renamed file?)")
    if meta["image"] not in {master_name(name, suffix) for suffix in IMAGE_SUFFIXES}:
        raise bad_template_file(
            path, f"its master picture {meta['image']!r} is not {name}.master.<png|jpg|webp>"
        )
    width, height = _positive(path, meta, "width"), _positive(path, meta, "height")
    # 2. tensors: (N, 4), (N, 5, 2), (N, 512) float32, finite; unit embeddings; boxes with area
    boxes = _checked(path, tensors, "boxes", (4,))
    landmarks = _checked(path, tensors, "landmarks", (5, 2))
    embeddings = _checked(path, tensors, "embeddings", (EMBEDDING_SIZE,))
    count = len(boxes)
    if not 1 <= count <= MAX_SLOTS or len(landmarks) != count or len(embeddings) != count:
        found = f"{count} boxes, {len(landmarks)} landmark sets, {len(embeddings)} embeddings"
        raise bad_template_file(path, f"{found}; expected one of each per slot, 1 to {MAX_SLOTS} slots")
    if not ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all():
        raise bad_template_file(path, "a slot's box has no area (x2 <= x1 or y2 <= y1)")
    norms = np.linalg.norm(embeddings.astype(np.float64), axis=1)  # (N,)
    if (np.abs(norms - 1.0) > _NORM_TOLERANCE).any():
        worst = float(norms[int(np.argmax(np.abs(norms - 1.0)))])
        raise bad_template_file(path, f"embeddings are not L2-normed (norm {worst:.4f}, expected 1 ± 0.001)")
    slots = tuple(
        Slot(i, (float(b[0]), float(b[1]), float(b[2]), float(b[3])), landmarks[i], embeddings[i])
        for i, b in enumerate(boxes)
    )
    return Template(
        name=name,
        image=meta["image"],
        image_sha256=meta["image_sha256"],
        width=width,
        height=height,
        slots=slots,
        recognizer_sha256=meta["recognizer_sha256"],
        created=meta["created"],
    )


def _read_metadata(path: Path, data: bytes) -> dict[str, str]:
    """The safetensors header's ``__metadata__``, checked for format, version and required keys."""
    meta = safetensors_metadata(data)
    if meta is None:
        raise bad_template_file(path, "not a safetensors file (no readable header)")
    found = (meta.get("format"), meta.get("version"))
    if found != (TEMPLATE_FORMAT, TEMPLATE_VERSION):
        raise bad_template_file(path, f"format/version {found}, expected ({TEMPLATE_FORMAT!r}, '1')")
    missing = [key for key in _METADATA_KEYS if not isinstance(meta.get(key), str) or not meta[key]]
    if missing:
        raise bad_template_file(path, f"metadata lacks {', '.join(missing)}")
    return meta


def _positive(path: Path, meta: dict[str, str], key: str) -> int:
    """A metadata value that must be a positive whole number (the master's width or height)."""
    value = meta[key]
    if not value.isdigit() or int(value) < 1:
        raise bad_template_file(path, f"{key} {value[:20]!r} is not a positive whole number")
    return int(value)


def _checked(path: Path, tensors: dict[str, np.ndarray], key: str, row: tuple[int, ...]) -> np.ndarray:
    """Tensor ``key`` of shape (N, *row), float32 and finite."""
    tensor = tensors.get(key)
    if tensor is None:
        raise bad_template_file(path, f"tensor {key!r} is missing")
    if tensor.ndim != 1 + len(row) or tuple(tensor.shape[1:]) != row:
        expected = "(N, " + ", ".join(map(str, row)) + ")"
        raise bad_template_file(path, f"tensor {key!r} has shape {tensor.shape}, expected {expected}")
    if tensor.dtype != np.float32:
        raise bad_template_file(path, f"tensor {key!r} has dtype {tensor.dtype}, expected float32")
    if not np.isfinite(tensor).all():
        raise bad_template_file(path, f"tensor {key!r} holds NaN or infinite values")
    return tensor
