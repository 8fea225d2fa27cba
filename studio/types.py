"""Type aliases that state their layout, and the enumerations shared across the studio."""

from __future__ import annotations

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
    "sd15", "sdxl", "controlnet", "lora", "detector", "recognizer", "swapper", "upscaler", "adapter"
]
MODEL_KINDS: tuple[ModelKind, ...] = get_args(ModelKind)

Device = Literal["auto", "cuda", "mps", "cpu"]
DEVICES: tuple[Device, ...] = get_args(Device)

DType = Literal["auto", "float16", "bfloat16", "float32"]
DTYPES: tuple[DType, ...] = get_args(DType)

ModelStatus = Literal["present", "missing", "corrupt", "unverified"]

Sampler = Literal[
    "Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE Karras", "DDIM", "UniPC", "LCM"
]  # AUTOMATIC1111 sampler names
SAMPLERS: tuple[Sampler, ...] = get_args(Sampler)
