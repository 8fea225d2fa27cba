"""Blend a swapped face crop back into the picture: crop-space masks, colour matching, ROI paste-back.

Masks live in crop space (the aligned square the swapper saw), are built once per size and settings, and
reach the canvas only through :func:`studio.geometry.paste_back`, which touches the face's region alone.
"""

from __future__ import annotations

import functools
import logging

import cv2
import numpy as np
import numpy.typing as npt

from studio.config import MaskConfig
from studio.errors import InputError
from studio.geometry import paste_back
from studio.types import Affine, ImageBGR, Mask

logger = logging.getLogger(__name__)


# ArcFace-aligned faces are taller than wide: the oval spans 85% of the crop's width and all its height.
_ELLIPSE_WIDTH = 0.85
# Reinhard's std ratio is clamped so that a flat (e.g. shadowed) source channel is not blown up.
_STD_RATIO_RANGE = (0.25, 4.0)
_MIN_WEIGHT = 1e-3  # total mask weight below which there is nothing to measure
_FLAT_STD = 0.5  # a source channel varying by less than half a level is flat: shifted, never scaled


@functools.lru_cache(maxsize=32)
def crop_mask(size: int, settings: MaskConfig) -> Mask:
    """Feathered box or ellipse mask of a ``size``-px crop: 0 on its border, 1 at its centre (read-only)."""
    half = (size - 1) / 2.0 - settings.padding * size  # px from the centre to the padded edge
    if half < 3.0:
        raise InputError(
            f"A {size}-px crop with padding {settings.padding} leaves no face area.",
            fix="lower the mask padding or use a larger crop.",
        )
    # the feather never reaches the centre pixels, so they are exactly 1
    feather = float(np.clip(settings.blur * size, 1.0, half - 1.0))
    offsets = np.arange(size, dtype=np.float32) - np.float32((size - 1) / 2.0)  # (size,) px from centre
    across, down = offsets[None, :], offsets[:, None]  # (1, size) x and (size, 1) y: broadcast to HxW
    if settings.shape == "box":
        inside = half - np.maximum(np.abs(across), np.abs(down))  # HxW px to the nearest edge
    else:
        radius_x, radius_y = _ELLIPSE_WIDTH * half, half
        reach = np.sqrt((across / radius_x) ** 2 + (down / radius_y) ** 2)  # HxW, 1 on the oval
        inside = (1.0 - reach) * min(radius_x, radius_y)  # HxW, ~px to the oval, monotone along rays
    ramp = np.clip(inside / feather, 0.0, 1.0)
    mask = (ramp * ramp * (3.0 - 2.0 * ramp)).astype(np.float32)  # smoothstep: no kink at either end
    mask.flags.writeable = False
    return mask


# Colour statistics live in YCbCr (BT.601 full range, JPEG's): a luma / chroma space where skin tones are
# compared channel by channel. It is linear in B, G, R, so the whole Reinhard transfer (each channel's
# mean and std moved to the target's) is one 3x4 colour matrix applied to the crop's bytes in one pass:
# no per-pixel conversion back from a float colour space. Rows: Y, Cb, Cr (no offsets); columns: B, G, R.
_BGR_TO_YCC = np.array(
    [[0.114, 0.587, 0.299], [0.5, -0.331264, -0.168736], [-0.081312, -0.418688, 0.5]], dtype=np.float64
)
_YCC_TO_BGR = np.linalg.inv(_BGR_TO_YCC)
_BGR_TO_YCC_F32 = _BGR_TO_YCC.astype(np.float32)  # what cv2.transform takes for a float32 crop

ColourStats = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]  # (3,) mean and (3,) std of Y, Cb, Cr


def colour_stats(crop: ImageBGR, mask: Mask) -> ColourStats | None:
    """YCbCr mean and std of ``crop`` weighted by ``mask``; None for an empty mask (nothing to measure)."""
    weights = np.asarray(mask, dtype=np.float32).reshape(-1)  # HxW -> (H*W,)
    total = float(weights.sum(dtype=np.float64))
    if total < _MIN_WEIGHT:
        return None
    ycc = cv2.transform(crop.astype(np.float32), _BGR_TO_YCC_F32)  # HxWx3 float32 Y, Cb, Cr
    squares = cv2.multiply(ycc, ycc)  # HxWx3 float32, one pass
    # weighted sums as (H*W,) x (H*W, 3) float32 products: no weighted copy of the crop is made
    mean = (weights @ ycc.reshape(-1, 3)).astype(np.float64) / total  # (3,)
    second = (weights @ squares.reshape(-1, 3)).astype(np.float64) / total  # (3,)
    return mean, np.sqrt(np.maximum(second - mean * mean, 0.0))


def match_colour(source: ImageBGR, target: ImageBGR | ColourStats | None, mask: Mask) -> ImageBGR:
    """``source`` with its YCbCr mean and std inside ``mask`` moved to ``target``'s (Reinhard transfer).

    ``target``: the target crop, or its :func:`colour_stats` computed once (one picture's faces keep
    theirs). An all-zero mask leaves nothing to measure (and nothing to paste): ``source`` comes back
    unchanged. The std ratio is clamped, and a flat source channel is shifted, never scaled.
    """
    if isinstance(target, np.ndarray):
        _check_same_crops(source, target, mask)
        target = colour_stats(target, mask)
    measured = colour_stats(source, mask)
    if target is None or measured is None:
        logger.debug("colour match skipped: the mask is empty")
        return source.copy()
    (source_mean, source_std), (target_mean, target_std) = measured, target
    flat = source_std <= _FLAT_STD
    ratio = np.where(flat, 1.0, np.clip(target_std / np.maximum(source_std, _FLAT_STD), *_STD_RATIO_RANGE))
    # ycc' = ratio * (ycc - source_mean) + target_mean, carried back to BGR: bgr' = M @ bgr + offset
    transfer = np.empty((3, 4), dtype=np.float64)
    transfer[:, :3] = _YCC_TO_BGR @ np.diag(ratio) @ _BGR_TO_YCC
    transfer[:, 3] = _YCC_TO_BGR @ (target_mean - ratio * source_mean)
    return cv2.transform(source, transfer.astype(np.float32))  # one pass, rounded and saturated to 0..255


def blend_face(
    canvas: ImageBGR,
    swapped_crop: ImageBGR,
    affine: Affine,
    settings: MaskConfig,
    *,
    original_crop: ImageBGR | None = None,
    colour_match: bool = True,
    mask: Mask | None = None,
    colour: ColourStats | None = None,
    strength: float = 1.0,
    poisson: bool = False,
    inplace: bool = False,
) -> ImageBGR:
    """The canvas with ``swapped_crop`` (aligned by ``affine`` at its own size) blended onto its face.

    ``original_crop`` is the target's aligned crop before swapping (any size; resized to the swapped crop's):
    the colour reference. ``mask`` (crop space, the swapped crop's side) replaces the box/ellipse of
    ``settings`` — e.g. :func:`studio.faces.masks.face_mask`, which also leaves occluders out — and
    ``colour`` the reference's :func:`colour_stats`, when the caller already has them. ``strength`` < 1 mixes
    the result with the canvas; ``poisson`` pastes with ``cv2.seamlessClone`` (in the face's ROI only).
    A new canvas comes back, or with ``inplace`` the caller's own, changed in the face's region alone.
    """
    # 1. check inputs
    size = _square_size(swapped_crop, "swapped crop")
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"Blend strength {strength} received.", fix="pass a strength from 0 to 1.")
    # 2. crop-space mask: the caller's (occlusion, regions), else the box or ellipse of the settings
    mask = crop_mask(size, settings) if mask is None else mask
    if np.shape(mask) != (size, size):
        raise InputError(f"Mask of shape {np.shape(mask)} for a {size}-px crop.", fix="pass one of its size.")
    # 3. bring the swapped skin to the target's colour
    if colour_match and colour is not None:
        swapped_crop = match_colour(swapped_crop, colour, mask)
    elif colour_match and original_crop is not None:
        swapped_crop = match_colour(swapped_crop, _resized_crop(original_crop, size), mask)
    # 4. paste back inside the face's region only
    weights = mask if strength == 1.0 else np.multiply(mask, np.float32(strength))
    return paste_back(canvas, swapped_crop, affine, weights, inplace=inplace, poisson=poisson)


def _square_size(crop: ImageBGR, name: str) -> int:
    """The side of a square HxWx3 uint8 crop, or InputError."""
    if crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3 or crop.shape[0] != crop.shape[1]:
        raise InputError(
            f"The {name} is {crop.dtype} of shape {crop.shape}.", fix="pass a square HxWx3 uint8 BGR crop."
        )
    return int(crop.shape[0])


def _resized_crop(crop: ImageBGR, size: int) -> ImageBGR:
    """The crop at ``size`` px (same content: crops of one face at two sizes differ by a pure scale)."""
    if _square_size(crop, "original crop") == size:
        return crop
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)


def _check_same_crops(source: ImageBGR, target: ImageBGR, mask: Mask) -> None:
    """Raise InputError unless source and target are HxWx3 uint8 of one size and the mask matches."""
    for name, image in (("source", source), ("target", target)):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(
                f"The {name} is {image.dtype} of shape {image.shape}.", fix="pass an HxWx3 uint8 BGR image."
            )
    if source.shape != target.shape or np.shape(mask) != source.shape[:2]:
        raise InputError(
            f"Source {source.shape}, target {target.shape} and mask {np.shape(mask)} differ in size.",
            fix="pass crops and mask of one size.",
        )
