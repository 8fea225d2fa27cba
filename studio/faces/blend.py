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


LabStats = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]  # (3,) mean and (3,) std of L, a, b


def lab_stats(crop: ImageBGR, mask: Mask) -> LabStats | None:
    """LAB mean and std of ``crop`` weighted by ``mask``; None for an empty mask (nothing to measure).

    BGR -> LAB here is a model-boundary conversion: skin statistics are compared in a perceptual space."""
    weights = np.asarray(mask, dtype=np.float32).reshape(-1)  # HxW -> (H*W,) float32
    total = float(weights.sum(dtype=np.float64))
    if total < _MIN_WEIGHT:
        return None
    return _weighted_stats(_to_lab(crop), weights, total)


def match_colour(source: ImageBGR, target: ImageBGR | LabStats | None, mask: Mask) -> ImageBGR:
    """``source`` shifted to ``target``'s LAB mean and std inside ``mask`` (Reinhard colour transfer).

    ``target``: the target crop, or its :func:`lab_stats` computed once (one picture's faces keep theirs).
    An all-zero mask leaves nothing to measure (and nothing to paste): ``source`` comes back unchanged.
    """
    if isinstance(target, np.ndarray):
        _check_same_crops(source, target, mask)
        target = lab_stats(target, mask)
    weights = np.asarray(mask, dtype=np.float32).reshape(-1)  # HxW -> (H*W,) float32
    total = float(weights.sum(dtype=np.float64))
    if target is None or total < _MIN_WEIGHT:
        logger.debug("colour match skipped: the mask is empty")
        return source.copy()
    source_lab = _to_lab(source)
    source_mean, source_std = _weighted_stats(source_lab, weights, total)
    target_mean, target_std = target
    safe_std = np.maximum(source_std, 1e-6)
    ratio = np.where(source_std > 1e-3, np.clip(target_std / safe_std, *_STD_RATIO_RANGE), 1.0)  # (3,)
    # lab * ratio + (target_mean - source_mean * ratio), per channel, as one 3x4 matrix over L, a, b
    transfer = np.zeros((3, 4), dtype=np.float32)
    np.fill_diagonal(transfer, ratio)
    transfer[:, 3] = target_mean - source_mean * ratio
    return _from_lab(cv2.transform(source_lab, transfer))  # HxWx3 float32 L, a, b -> same layout


def blend_face(
    canvas: ImageBGR,
    swapped_crop: ImageBGR,
    affine: Affine,
    settings: MaskConfig,
    *,
    original_crop: ImageBGR | None = None,
    colour_match: bool = True,
    mask: Mask | None = None,
    colour: LabStats | None = None,
    strength: float = 1.0,
    poisson: bool = False,
    inplace: bool = False,
) -> ImageBGR:
    """The canvas with ``swapped_crop`` (aligned by ``affine`` at its own size) blended onto its face.

    ``original_crop`` is the target's aligned crop before swapping (any size; resized to the swapped crop's):
    the colour reference. ``mask`` (crop space, the swapped crop's side) replaces the box/ellipse of
    ``settings`` — e.g. :func:`studio.faces.masks.face_mask`, which also leaves occluders out — and
    ``colour`` the reference's :func:`lab_stats`, when the caller already has them. ``strength`` < 1 mixes
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


def _to_lab(image: ImageBGR) -> npt.NDArray[np.float32]:
    """BGR uint8 -> LAB float32 (L 0..100, a and b about -128..127), HxWx3."""
    scaled = np.multiply(image, np.float32(1.0 / 255.0), dtype=np.float32)  # HxWx3 float32 BGR in [0, 1]
    return cv2.cvtColor(scaled, cv2.COLOR_BGR2LAB)  # HxWx3 float32 L, a, b


def _from_lab(lab: npt.NDArray[np.float32]) -> ImageBGR:
    """LAB float32 (any values; L clipped to 0..100) -> BGR uint8, clipped to the displayable range."""
    np.clip(lab[:, :, 0], 0.0, 100.0, out=lab[:, :, 0])  # the L plane, a strided HxW view, in place
    bgr = cv2.cvtColor(lab, cv2.COLOR_LAB2BGR)  # HxWx3 float32 L, a, b -> B, G, R about [0, 1]
    # x255, rounded half to even, saturated to 0..255 (negatives first clipped to 0: convertScaleAbs
    # would reflect them): np.clip(np.rint(bgr * 255), 0, 255).astype(np.uint8) in two cv2 passes
    return cv2.convertScaleAbs(cv2.max(bgr, 0.0), alpha=255.0)


def _weighted_stats(
    lab: npt.NDArray[np.float32], weights: npt.NDArray[np.float32], total: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per-channel mean and std of an HxWx3 image, weighted by ``weights`` (H*W,) summing to ``total``."""
    pixels = lab.reshape(-1, 3)  # HxWx3 -> (H*W, 3) float32 L, a, b
    mean = (weights @ pixels).astype(np.float64) / total  # (3,): one float32 matrix product
    # cv2 subtracts a per-channel scalar in one pass (numpy broadcasts over a length-3 inner loop, 10x slower)
    centred = cv2.subtract(lab, (*mean.tolist(), 0.0))  # HxWx3 float32
    squares = cv2.multiply(centred, centred).reshape(-1, 3)  # HxWx3 -> (H*W, 3) float32
    variance = (weights @ squares).astype(np.float64) / total  # (3,)
    return mean, np.sqrt(variance)


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
