"""Type aliases that state their layout, and the enumerations shared across the studio."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias, get_args

import numpy as np
import numpy.typing as npt

ImageBGR: TypeAlias = npt.NDArray[np.uint8]  # HxWx3 uint8 BGR (OpenCV order)
ImageRGB: TypeAlias = npt.NDArray[np.uint8]  # HxWx3 uint8 RGB (PIL / diffusers order)
Mask: TypeAlias = npt.NDArray[np.float32]  # HxW float32 in [0, 1]
Embedding: TypeAlias = npt.NDArray[np.float32]  # (512,) float32, L2-normed
Landmark5: TypeAlias = npt.NDArray[np.float32]  # (5, 2) x, y in pixels: eyes, nose, mouth corners
Affine: TypeAlias = npt.NDArray[np.float64]  # (2, 3) forward affine, source px -> crop px

ModelKind = Literal[
    "sd15",
    "sdxl",
    "controlnet",
    "lora",
    "detector",
    "recognizer",
    "swapper",
    "upscaler",
    "adapter",
    "annotator",
    "safety",
    "occluder",
    "parser",
    "enhancer",
]
MODEL_KINDS: tuple[ModelKind, ...] = get_args(ModelKind)

Device = Literal["auto", "cuda", "mps", "cpu"]
DEVICES: tuple[Device, ...] = get_args(Device)

DType = Literal["auto", "float16", "bfloat16", "float32"]
DTYPES: tuple[DType, ...] = get_args(DType)

ModelStatus = Literal["present", "missing", "corrupt", "unverified"]

Sampler = Literal[
    "Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE Karras", "DDIM", "UniPC", "LCM"
]  # AUTOMATIC1111's full (pre-1.9) sampler names
SAMPLERS: tuple[Sampler, ...] = get_args(Sampler)

PoseSource = Literal["auto", "image", "keypoints", "photo"]  # what a --pose file is


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face on a canvas: box, 5 landmarks and detector score, in canvas pixels."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in px
    landmarks: Landmark5
    score: float

    @property
    def size(self) -> float:
        """The face's side in px: the mean of box width and height."""
        return ((self.box[2] - self.box[0]) + (self.box[3] - self.box[1])) / 2

    @property
    def area(self) -> float:
        """Box area in px²."""
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclass(frozen=True, eq=False)
class Identity:
    """An enrolled person: mean embedding, per-photo embeddings and the consent that allows their use."""

    name: str
    embedding: Embedding  # (512,) float32, L2-normed mean of the photo embeddings
    photo_embeddings: npt.NDArray[np.float32]  # (K, 512) float32, each row L2-normed
    consent: str  # the consent record, e.g. "release #123, 2026-11-01"
    recognizer_sha256: str  # the recognizer that made the embeddings
    source_sha256: tuple[str, ...]  # sha256 of each enrolment photo
    created: str  # ISO-8601 UTC
    revoked: str | None = None  # ISO-8601 UTC time of revocation; a revoked identity cannot be used
    face_tokens: npt.NDArray[np.float32] | None = None  # (K, T, C) per enrolment photo
    file_sha256: str = ""  # sha256 of the identity file these values were read from (for recipes)
    scope: tuple[str, ...] = ()  # purposes the consent allows (ads, internal, ...); () = any (v1 files)
    expires: str | None = None  # ISO date: the last day of allowed use
    evidence_sha256: str = ""  # sha256 of the signed release document
    granted_by: str = ""  # who granted (or recorded) the consent


FaceAdapterKind = Literal["fact", "ipadapter-faceid"]  # identity-conditioned draft adapters
