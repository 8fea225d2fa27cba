"""Occlusion and face-parsing masks, in crop space, combined with the box/ellipse mask by intersection.

Both models see the target's *original* aligned crop (an occluder or a face region belongs to the picture,
not to the swapped face), so one picture's masks are computed once and shared by every identity refined
onto it (see :mod:`studio.faces.analysis`). The layouts are FaceFusion's (3.x ``face_masker.py``):

- occluder (XSeg, ``xseg_1.onnx``): the crop resized to the model's side, BGR, x/255, NHWC
  ``[1, S, S, 3]`` -> ``[1, S, S, 1]`` in [0, 1] (1 = face, 0 = something in front of it);
- parser (BiSeNet, ``bisenet_resnet_34.onnx``): RGB, x/255, ImageNet mean/std, NCHW ``[1, 3, 512, 512]``
  -> ``[1, 19, 512, 512]`` class scores; the regions asked for are the argmax classes kept.

Each mask is resized back to the crop, Gaussian-blurred (sigma 5) and re-stretched from [0.5, 1] to
[0, 1], as FaceFusion does, so a mask edge is soft but the inside of an occluder stays exactly 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from studio.config import FACE_REGION_CLASSES, FaceRegion, MaskConfig
from studio.errors import ModelError
from studio.faces.blend import crop_mask
from studio.models.resolve import ResolvedModel
from studio.types import ImageBGR, Mask

logger = logging.getLogger(__name__)

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)  # RGB
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)  # RGB
_EDGE_SIGMA = 5.0  # px: FaceFusion's mask softening


@dataclass(frozen=True)
class MaskModel:
    """A loaded occluder or face parser: its ORT session and the side of the square it reads. Equal (and
    hashed) by its file's sha256 and side: per-picture masks are kept under it."""

    name: str
    sha256: str
    size: int  # px side of the model's square input
    session: Any = field(compare=False)  # onnxruntime.InferenceSession

    @classmethod
    def load(cls, model: ResolvedModel, session: Any, default_size: int) -> MaskModel:
        """Wrap ``session``; the input side comes from the catalogue's io facts, else the graph."""
        io = model.entry.io if model.entry is not None else {}
        size = int(io.get("size", 0)) or _graph_side(session, default_size)
        return cls(model.label, model.sha256, size, session)


def face_mask(
    crop: ImageBGR,
    settings: MaskConfig,
    *,
    occluder: MaskModel | None = None,
    parser: MaskModel | None = None,
) -> Mask:
    """The blend mask of one original aligned crop: box/ellipse ∩ occlusion ∩ parser regions (minimum)."""
    size = int(crop.shape[0])
    layers = [crop_mask(size, settings)]
    if settings.occlusion:
        layers.append(occlusion_mask(_required(occluder, "occluder", "refine.mask.occlusion"), crop))
    if settings.regions:
        layers.append(region_mask(_required(parser, "parser", "refine.mask.regions"), crop, settings.regions))
    if len(layers) == 1:
        return layers[0]
    return np.minimum.reduce(layers).clip(0.0, 1.0)  # HxW float32


def occlusion_mask(model: MaskModel, crop: ImageBGR) -> Mask:
    """HxW float32 in [0, 1] over the crop: 0 where something covers the face."""
    blob = _prepare_occluder(crop, model.size)
    raw = _forward_mask_model(model, blob)  # (1, S, S, 1)
    if raw.shape != (1, model.size, model.size, 1):
        raise ModelError(
            f"{model.name}: occluder output of shape {raw.shape}; expected (1, S, S, 1), S = {model.size}.",
            fix="point refine.occluder at an XSeg model in FaceFusion's layout (xseg_1).",
        )
    return _soften(np.clip(raw[0, :, :, 0], 0.0, 1.0).astype(np.float32), crop.shape[0])


def region_mask(model: MaskModel, crop: ImageBGR, regions: Sequence[FaceRegion]) -> Mask:
    """HxW float32 in [0, 1] over the crop: 1 on the parser's ``regions``, 0 elsewhere."""
    blob = _prepare_parser(crop, model.size)
    raw = _forward_mask_model(model, blob)  # (1, 19, S, S)
    if raw.ndim != 4 or raw.shape[0] != 1 or raw.shape[1] <= max(FACE_REGION_CLASSES.values()):
        raise ModelError(
            f"{model.name}: face-parser output of shape {raw.shape}; expected (1, 19, S, S).",
            fix="point refine.parser at a BiSeNet face parser in FaceFusion's layout (bisenet_resnet_34).",
        )
    classes = raw[0].argmax(axis=0)  # (S, S) class index per pixel
    keep = np.isin(classes, [FACE_REGION_CLASSES[r] for r in regions]).astype(np.float32)  # (S, S)
    return _soften(keep, crop.shape[0])


def _required(model: MaskModel | None, role: str, setting: str) -> MaskModel:
    if model is None:
        raise ModelError(f"{setting} is set but no {role} model was loaded.", fix=f"set refine.{role}.")
    return model


def _prepare_occluder(crop: ImageBGR, size: int) -> npt.NDArray[np.float32]:
    """HxWx3 uint8 BGR -> (1, S, S, 3) float32 BGR in [0, 1], NHWC (FaceFusion feeds XSeg BGR)."""
    resized = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
    return (resized[None].astype(np.float32) / np.float32(255.0)).astype(np.float32)  # 1xSxSx3


def _prepare_parser(crop: ImageBGR, size: int) -> npt.NDArray[np.float32]:
    """HxWx3 uint8 BGR -> (1, 3, S, S) float32 RGB, ImageNet-normalised, NCHW."""
    resized = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
    rgb = resized[:, :, ::-1].astype(np.float32) / np.float32(255.0)  # SxSx3 BGR -> RGB in [0, 1]
    normed = (rgb - _IMAGENET_MEAN) / _IMAGENET_STD  # SxSx3 RGB
    return np.ascontiguousarray(normed.transpose(2, 0, 1)[None], dtype=np.float32)  # SxSx3 -> 1x3xSxS


def _forward_mask_model(model: MaskModel, blob: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """One model call on its single input, fetching the first output only (BiSeNet's two auxiliary heads,
    19 x 512 x 512 each, are never computed into Python)."""
    name, output = model.session.get_inputs()[0].name, model.session.get_outputs()[0].name
    return np.asarray(model.session.run([output], {name: blob})[0], dtype=np.float32)


def _soften(mask: npt.NDArray[np.float32], side: int) -> Mask:
    """Resized to the crop's side, blurred, then [0.5, 1] stretched to [0, 1] (FaceFusion's edge)."""
    resized = cv2.resize(mask, (side, side), interpolation=cv2.INTER_LINEAR)
    blurred = cv2.GaussianBlur(np.clip(resized, 0.0, 1.0), (0, 0), _EDGE_SIGMA)
    return ((np.clip(blurred, 0.5, 1.0) - 0.5) * 2.0).astype(np.float32)  # HxW float32 in [0, 1]


def _graph_side(session: Any, default: int) -> int:
    """The square side in the graph's input shape (NCHW or NHWC), else ``default`` for dynamic dims."""
    shape = session.get_inputs()[0].shape
    sides = [d for d in shape[1:] if isinstance(d, int) and d > 3]
    return int(sides[0]) if sides else default
