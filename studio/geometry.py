"""Alignment templates, affine warps and ROI paste-back (numpy and OpenCV only).

Conventions: an :data:`~studio.types.Affine` maps canvas pixels to crop pixels (the matrix
``cv2.warpAffine`` takes to cut a crop); pixel centres sit on integer coordinates, as in OpenCV.
Paste-back works on the region of interest (ROI) its crop-space mask reaches and nothing else: its cost
follows the face's area, not the canvas's, and every pixel outside the ROI is returned byte-identical.
"""

from __future__ import annotations

import math
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

from studio.errors import InputError
from studio.types import Affine, ImageBGR, Landmark5, Mask

# insightface's ``face_align.arcface_dst``: eyes, nose tip, mouth corners in a 112-px ArcFace crop.
ARCFACE_TEMPLATE: Landmark5 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)  # (5, 2) x, y px
ARCFACE_TEMPLATE.flags.writeable = False

# FFHQ alignment (GFPGAN, CodeFormer and FaceFusion's ``ffhq_512``): the same 5 points as fractions of the
# crop's side; the face sits lower and smaller than in the ArcFace crop, with room for hair and chin.
FFHQ_TEMPLATE: npt.NDArray[np.float64] = np.array(
    [[0.37691676, 0.46864664], [0.62285697, 0.46912813], [0.50123859, 0.61331904], [0.39308822, 0.72541100],
     [0.61150205, 0.72490465]],
)  # fmt: skip
FFHQ_TEMPLATE.flags.writeable = False
AlignTemplate = Literal["arcface", "ffhq"]  # which 5-point template a model's crops are aligned to

Region = tuple[int, int, int, int]  # (x0, y0, x1, y1) canvas px, end-exclusive
_MIN_SPREAD = 1e-6  # px²: landmarks whose mean squared distance from their centre is below it coincide


def arcface_template(size: int) -> npt.NDArray[np.float64]:
    """The ArcFace template for a ``size``-px crop, as insightface's ``estimate_norm`` places it."""
    if size < 16:
        raise InputError(f"Crop size {size} px is too small.", fix="use a crop of at least 16 px (e.g. 128).")
    # insightface: multiples of 112 scale the template by size/112; otherwise (128 for inswapper, and its
    # upscales) by size/128 and shift it 8*size/128 px right. insightface accepts only multiples of 112 or
    # 128; other sizes follow the 128 convention here.
    if size % 112 == 0:
        ratio, shift_x = size / 112.0, 0.0
    else:
        ratio, shift_x = size / 128.0, 8.0 * size / 128.0
    template = ARCFACE_TEMPLATE.astype(np.float64) * ratio  # (5, 2) x, y px
    template[:, 0] += shift_x
    return template


def _similarity(src: npt.NDArray[np.float64], dst: npt.NDArray[np.float64]) -> Affine | None:
    """Least-squares similarity (Umeyama 1991, no reflection) taking ``src`` points onto ``dst``; None
    when the ``src`` points coincide.

    In two dimensions Umeyama's SVD solution has a closed form: with both point sets centred, the matrix
    ``[[a, -b], [b, a]]`` (scale times rotation) has ``a = sum(s . d) / sum(|s|^2)`` and ``b = sum(s x d) /
    sum(|s|^2)``, the best proper rotation even where the SVD would need its reflection fix. Five points
    in plain floats: a few microseconds, where the SVD took ten times as long (paid by every face).
    """
    source, target = src.tolist(), dst.tolist()  # [[x, y], ...] px
    count = len(source)
    src_x, src_y = sum(p[0] for p in source) / count, sum(p[1] for p in source) / count
    dst_x, dst_y = sum(p[0] for p in target) / count, sum(p[1] for p in target) / count
    spread = dot = cross = 0.0
    for (x, y), (u, v) in zip(source, target, strict=True):
        x, y, u, v = x - src_x, y - src_y, u - dst_x, v - dst_y
        spread, dot, cross = spread + x * x + y * y, dot + x * u + y * v, cross + x * v - y * u
    if spread < _MIN_SPREAD * count:
        return None
    a, b = dot / spread, cross / spread
    return np.array([[a, -b, dst_x - a * src_x + b * src_y], [b, a, dst_y - b * src_x - a * src_y]])


def estimate_alignment(landmarks: Landmark5, size: int, template: AlignTemplate = "arcface") -> Affine:
    """Similarity transform taking 5 face landmarks onto ``template`` in a ``size``-px crop.

    Umeyama least squares (in its 2-D closed form), the estimator behind insightface's ``estimate_norm``
    (``skimage.transform.SimilarityTransform``), so crops match what inswapper and ArcFace expect (and,
    with ``template="ffhq"``, what the GFPGAN / CodeFormer face enhancers expect).
    """
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise InputError(
            f"Landmarks of shape {points.shape} (finite: {bool(np.isfinite(points).all())}) received.",
            fix="pass 5 finite (x, y) points: eyes, nose tip, mouth corners.",
        )
    target = FFHQ_TEMPLATE * float(size) if template == "ffhq" else arcface_template(size)  # (5, 2) x, y px
    affine = _similarity(points, target)
    if affine is None:
        raise InputError("All 5 landmarks coincide.", fix="pass the landmarks of a detected face.")
    return affine


def rescale_affine(affine: Affine, factor: float) -> Affine:
    """The affine of the same crop resampled ``factor`` times larger (e.g. after a 4x face upscale).

    Pixel centres stay on the same content: crop coordinate ``x`` becomes ``factor * x + (factor - 1) / 2``
    (the half-pixel convention of ``cv2.resize`` and super-resolution networks), not ``factor * x``.
    """
    if factor <= 0:
        raise InputError(f"Scale factor {factor} received.", fix="pass a positive factor, e.g. 4.")
    offset = (factor - 1.0) / 2.0
    scaled = np.asarray(affine, dtype=np.float64) * factor
    scaled[:, 2] += offset
    return scaled


def warp_to_crop(image: ImageBGR, affine: Affine, size: int) -> ImageBGR:
    """Aligned ``size`` x ``size`` crop: bilinear, black outside the image, as insightface's norm_crop."""
    return cv2.warpAffine(image, _checked_affine(affine), (size, size), borderValue=0.0)


def crop_region(affine: Affine, size: int, image_shape: tuple[int, int], pad: int = 2) -> Region:
    """The canvas ROI (x0, y0, x1, y1), end-exclusive, that the crop square covers, clipped to the image."""
    last = float(size - 1)
    return _canvas_box(affine, (0.0, 0.0, last, last), image_shape, pad)


def mask_region(affine: Affine, mask: Mask, image_shape: tuple[int, int], pad: int = 2) -> Region:
    """The canvas ROI (x0, y0, x1, y1), end-exclusive, where a paste through crop-space ``mask`` can reach.

    The box of the mask's nonzero pixels, one crop px wider on each side (bilinear sampling reaches that
    far), mapped to the canvas and clipped to it: at most the crop square's ROI for a mask that is zero on
    its border, as :func:`studio.faces.blend.crop_mask` is. Empty (x0 == x1) for an all-zero mask.
    """
    support = cv2.compare(np.asarray(mask, dtype=np.float32), 0.0, cv2.CMP_GT)  # HxW uint8, 255 where > 0
    x, y, width, height = cv2.boundingRect(support)  # crop px box of the nonzero pixels
    if width == 0 or height == 0:
        return 0, 0, 0, 0
    return _canvas_box(affine, (x - 1.0, y - 1.0, float(x + width), float(y + height)), image_shape, pad)


def paste_back(
    canvas: ImageBGR,
    crop: ImageBGR,
    affine: Affine,
    mask: Mask,
    *,
    inplace: bool = False,
    poisson: bool = False,
) -> ImageBGR:
    """``canvas`` with ``crop`` warped back and blended through its crop-space ``mask``, in the mask's ROI.

    A new canvas, or with ``inplace`` the caller's own, changed and returned: no full-canvas copy, so the
    cost follows the face's area alone. Every pixel outside :func:`mask_region` is left byte-identical.
    With ``poisson`` the crop is first cloned into the ROI with ``cv2.seamlessClone`` (its gradients, the
    canvas's colours at the mask's edge), then blended through the same soft mask: a pixel the mask leaves
    at 0 (an occluder) is still untouched.
    """
    # 1. check inputs
    _check_paste_inputs(canvas, crop, mask)
    affine = _checked_affine(affine)
    weights = np.clip(np.asarray(mask, dtype=np.float32), 0.0, 1.0)  # HxW float32: bilinear keeps [0, 1]
    result = canvas if inplace else canvas.copy()
    # 2. the ROI the mask reaches: nothing else is read or written
    x0, y0, x1, y1 = mask_region(affine, weights, canvas.shape[:2])
    if x1 <= x0 or y1 <= y0:
        return result  # an all-zero mask, or a crop entirely off the canvas
    # 3. warp crop and mask into the ROI alone: crop px -> canvas px, then shifted to the ROI origin
    to_roi = cv2.invertAffineTransform(affine)  # (2, 3) crop px -> canvas px
    to_roi[:, 2] -= (x0, y0)  # canvas px -> ROI px
    roi_size = (x1 - x0, y1 - y0)  # (width, height) as cv2 wants it
    warped = _warp_bgr(crop, to_roi, roi_size)
    weight = cv2.warpAffine(weights, to_roi, roi_size, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    roi = result[y0:y1, x0:x1]  # HxWx3 uint8 view into the result canvas
    if poisson:
        warped = _seamless(warped, roi, weight)
    # 4. blend roi*(1-m) + warped*m: cv2.blendLinear does it in float32 per pixel and rounds to uint8 in one
    # pass, written straight into the ROI (a row-strided view, which cv2 takes as it is); m == 0 leaves a
    # pixel exactly as it was
    cv2.blendLinear(warped, roi, weight, 1.0 - weight, dst=roi)
    return result


def _seamless(warped: ImageBGR, roi: ImageBGR, weight: Mask) -> ImageBGR:
    """``warped`` Poisson-cloned into a copy of ``roi`` where ``weight`` > 0 (both ROI-sized, no shift)."""
    support = cv2.compare(weight, 0.0, cv2.CMP_GT)  # hxw uint8, 255 where the mask reaches
    support[0, :], support[-1, :], support[:, 0], support[:, -1] = 0, 0, 0, 0  # seamlessClone ignores it
    x, y, width, height = cv2.boundingRect(support)
    if width < 3 or height < 3:
        return warped
    # seamlessClone centres the mask's bounding box on ``center``: this centre puts it back where it is
    center = (x + width // 2, y + height // 2)
    return cv2.seamlessClone(warped, np.ascontiguousarray(roi), support, center, cv2.NORMAL_CLONE)


def _warp_bgr(crop: ImageBGR, to_roi: Affine, roi_size: tuple[int, int]) -> ImageBGR:
    """``crop`` warped into the ROI, bilinear, edges replicated: byte for byte what ``cv2.warpAffine`` gives.

    OpenCV's bilinear warp of uint8 is vectorised for 4 channels but not for 3, so the crop travels padded
    with an alpha plane: the same bytes as warping the 3 channels, in less than half the time.
    """
    padded = cv2.cvtColor(crop, cv2.COLOR_BGR2BGRA)  # HxWx3 BGR -> HxWx4 BGR + 255 (layout, not colour)
    warped = cv2.warpAffine(padded, to_roi, roi_size, borderMode=cv2.BORDER_REPLICATE)  # hxwx4
    return cv2.cvtColor(warped, cv2.COLOR_BGRA2BGR)  # hxwx4 -> hxwx3 BGR: the alpha plane dropped


def _canvas_box(
    affine: Affine, box: tuple[float, float, float, float], image_shape: tuple[int, int], pad: int
) -> Region:
    """The canvas ROI holding crop-px ``box`` (x0, y0, x1, y1, inclusive) mapped back, padded, clipped."""
    inverse = cv2.invertAffineTransform(_checked_affine(affine))  # (2, 3) crop px -> canvas px
    left, top, right, bottom = box
    corners = np.array([[left, top], [right, top], [left, bottom], [right, bottom]])  # (4, 2) x, y crop px
    mapped = corners @ inverse[:, :2].T + inverse[:, 2]  # (4, 2) x, y canvas px
    (low_x, low_y), (high_x, high_y) = mapped.min(axis=0).tolist(), mapped.max(axis=0).tolist()
    height, width = int(image_shape[0]), int(image_shape[1])
    x0 = min(max(math.floor(low_x) - pad, 0), width)
    y0 = min(max(math.floor(low_y) - pad, 0), height)
    x1 = min(max(math.ceil(high_x) + 1 + pad, x0), width)
    y1 = min(max(math.ceil(high_y) + 1 + pad, y0), height)
    return x0, y0, x1, y1


def _checked_affine(affine: Affine) -> Affine:
    """The affine as a finite, invertible (2, 3) float64 matrix, or InputError."""
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (2, 3) or not np.isfinite(matrix).all():
        raise InputError(f"Affine of shape {matrix.shape} received.", fix="pass a finite (2, 3) matrix.")
    if abs(float(np.linalg.det(matrix[:, :2]))) < 1e-12:
        raise InputError("The affine is singular (zero scale).", fix="estimate it from real landmarks.")
    return matrix


def _check_paste_inputs(canvas: ImageBGR, crop: ImageBGR, mask: Mask) -> None:
    """Raise InputError unless canvas and crop are HxWx3 uint8, the crop square and the mask crop-sized."""
    for name, image in (("canvas", canvas), ("crop", crop)):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(
                f"The {name} is {image.dtype} of shape {image.shape}.", fix="pass an HxWx3 uint8 BGR image."
            )
    if crop.shape[0] != crop.shape[1]:
        raise InputError(f"The crop is {crop.shape[1]}x{crop.shape[0]} px.", fix="pass a square crop.")
    if mask.shape != crop.shape[:2]:
        raise InputError(
            f"Mask of shape {mask.shape} for a crop of {crop.shape[:2]}.", fix="build the mask at crop size."
        )
