"""Face enhancer: GFPGAN 1.4 or CodeFormer in the ONNX layout FaceFusion uses (``face_enhancer.py``).

The crop is FFHQ-aligned at the model's side (512): RGB, (x/255 - 0.5)/0.5, NCHW ``[1, 3, 512, 512]``;
CodeFormer takes a second input, ``weight`` (float64 ``[1]``): its fidelity, 1 = closest to the input face.
The output, in [-1, 1], comes back as a uint8 BGR crop of the same side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from studio.errors import InputError, ModelError
from studio.imageio import planes_to_bgr
from studio.models.catalogue import ModelEntry
from studio.types import ImageBGR

logger = logging.getLogger(__name__)

ENHANCER_SIZE = 512  # px: GFPGAN 1.4 and CodeFormer read 512x512 FFHQ-aligned faces
_WEIGHT_INPUT = "weight"  # CodeFormer's fidelity input, as FaceFusion names it


@dataclass(frozen=True, eq=False)
class FaceEnhancer:
    """A loaded GFPGAN / CodeFormer session; ``fidelity`` feeds CodeFormer's weight input."""

    name: str
    session: Any  # onnxruntime.InferenceSession
    size: int
    fidelity: float
    weighted: bool  # CodeFormer: the graph takes its fidelity weight as a second input

    @classmethod
    def load(cls, entry: ModelEntry | None, path: Path, session: Any, fidelity: float) -> FaceEnhancer:
        """Wrap ``session``; its side comes from the catalogue's io facts (default 512)."""
        io = entry.io if entry is not None else {}
        name = entry.name if entry is not None else path.name
        inputs = {i.name for i in session.get_inputs()}
        if "input" not in inputs or not inputs <= {"input", _WEIGHT_INPUT}:
            raise ModelError(
                f"{name}: inputs {sorted(inputs)}; an enhancer takes 'input' (and CodeFormer 'weight').",
                fix="point refine.enhance.model at gfpgan_1_4 or codeformer (FaceFusion's ONNX files).",
            )
        return cls(name, session, int(io.get("size", ENHANCER_SIZE)), fidelity, _WEIGHT_INPUT in inputs)

    def enhance(self, crop: ImageBGR) -> ImageBGR:
        """The FFHQ-aligned crop (side ``size``, HxWx3 uint8 BGR) restored by the model, same layout."""
        if crop.dtype != np.uint8 or crop.shape != (self.size, self.size, 3):
            raise InputError(
                f"Enhancer crop {crop.dtype} {crop.shape}; expected uint8 ({self.size}, {self.size}, 3).",
                fix="cut the crop with the ffhq template at the enhancer's size.",
            )
        pred = _forward_enhancer(self, _prepare_blob(crop))
        if pred.shape != (1, 3, self.size, self.size):
            raise ModelError(
                f"{self.name}: output of shape {pred.shape} for a {self.size}-px input.",
                fix="check the catalogue entry's io.size against the model file.",
            )
        return _normalize_output(pred)


def _prepare_blob(crop: ImageBGR) -> npt.NDArray[np.float32]:
    """HxWx3 uint8 BGR -> (1, 3, H, W) float32 RGB in [-1, 1], NCHW."""
    rgb = crop[:, :, ::-1].astype(np.float32) / np.float32(255.0)  # HxWx3 BGR -> RGB in [0, 1]
    chw = ((rgb - 0.5) / 0.5).transpose(2, 0, 1)  # HxWx3 -> 3xHxW in [-1, 1]
    return np.ascontiguousarray(chw[None], dtype=np.float32)  # -> 1x3xHxW


def _forward_enhancer(enhancer: FaceEnhancer, blob: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """One model call; CodeFormer also gets its fidelity weight (float64 [1])."""
    feeds: dict[str, npt.NDArray[Any]] = {"input": blob}
    if enhancer.weighted:
        feeds[_WEIGHT_INPUT] = np.array([enhancer.fidelity], dtype=np.float64)
    return np.asarray(enhancer.session.run(None, feeds)[0], dtype=np.float32)


def _normalize_output(pred: npt.NDArray[np.float32]) -> ImageBGR:
    """(1, 3, H, W) float RGB in [-1, 1] -> HxWx3 uint8 BGR, rounded."""
    return planes_to_bgr(pred[0], low=-1.0)  # 3xHxW RGB -> HxWx3 BGR, contiguous
