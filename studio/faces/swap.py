"""Swap a face to an identity with inswapper: one aligned crop, one model call, a blend in the face's region.

The identity enters the swapper as a *latent*: the identity's normed ArcFace embedding times the model's
``emap`` (its last initializer), renormalised. It depends only on the identity and the model file, so it is
computed once per pair and cached. The swap itself runs on the 128-px ArcFace-aligned crop of the target
face; an optional Real-ESRGAN pass sharpens the swapped crop before it is blended back. Every step after
the model call works on the crop or on the face's region of the canvas, never on the whole canvas.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from studio.config import RefineConfig
from studio.errors import InputError, ModelError
from studio.faces.blend import MaskHook, MaskSettings, blend_face, crop_mask
from studio.geometry import crop_region, estimate_alignment, rescale_affine, warp_to_crop
from studio.models.cache import ModelCache
from studio.types import Affine, Embedding, Face, ImageBGR

if TYPE_CHECKING:
    from studio.faces.upscale import Upscaler

logger = logging.getLogger(__name__)

UpscaleMode = Literal["auto", "on", "off"]
Latent = npt.NDArray[np.float32]  # (1, 512) float32, L2-normed: normed embedding @ emap, renormalised
SwapBlob = npt.NDArray[np.float32]  # (1, 3, S, S) float32 RGB in [0, 1], NCHW

_EMBEDDING_SIZE = 512
_REGION_PAD = 2  # px of slack around the paste region, as geometry.crop_region


class Swapper(Protocol):
    """What the studio needs of insightface's ``INSwapper`` (``load_insightface_model`` returns one)."""

    model_file: str
    session: Any  # onnxruntime.InferenceSession
    emap: npt.NDArray[np.float32]  # (512, 512): the graph's last initializer
    input_names: list[str]  # from the session: [target image, source latent]
    output_names: list[str]
    input_size: tuple[int, int]  # (width, height) of the aligned crop, (128, 128) for inswapper_128


@dataclass(frozen=True)
class RefineFaceSettings:
    """How one face is refined: blend mask, colour matching, crop upscaling and its tile size."""

    mask: MaskSettings = field(default_factory=MaskSettings)
    colour_match: bool = True
    upscale: UpscaleMode = "auto"  # auto: when the face is larger on the canvas than the swapper's crop
    tile: int = 0  # Real-ESRGAN tile size in px, 0 = the whole crop at once

    def __post_init__(self) -> None:
        if self.upscale not in ("auto", "on", "off"):
            raise InputError(f"Upscale mode {self.upscale!r} received.", fix="use 'auto', 'on' or 'off'.")
        if self.tile < 0:
            raise InputError(f"Upscale tile {self.tile} received.", fix="use 0 (no tiling) or a size in px.")

    @classmethod
    def from_config(cls, config: RefineConfig) -> RefineFaceSettings:
        """The settings a ``[refine]`` config section asks for."""
        mask = MaskSettings(shape=config.mask, padding=config.mask_padding, blur=config.mask_blur)
        return cls(
            mask=mask, colour_match=config.colour_match, upscale=config.upscale, tile=config.upscale_tile
        )


@dataclass(frozen=True)
class FaceStats:
    """What refining one face did: whether its crop was upscaled, the crop's side, step times in ms."""

    upscaled: bool
    crop_size: int  # px side of the crop that was blended (128, or 128 x the upscaler's scale)
    timings: dict[str, float]  # ms: "swap" (crop + model), "upscale", "blend"


def identity_latent(embedding: Embedding, emap: npt.NDArray[np.float32]) -> Latent:
    """The swapper's source input: (normed embedding @ emap) renormalised, exactly as ``INSwapper.get``."""
    vector = np.asarray(embedding, dtype=np.float32).reshape(-1)  # (512,)
    matrix = np.asarray(emap, dtype=np.float32)
    if vector.shape[0] != matrix.shape[0] or matrix.ndim != 2 or not np.isfinite(vector).all():
        raise InputError(
            f"Embedding of shape {np.shape(embedding)} for an emap of shape {matrix.shape}.",
            fix=f"pass a finite ({matrix.shape[0]},) ArcFace embedding made by the catalogued recognizer.",
        )
    norm = float(np.linalg.norm(vector))
    if norm < 1e-6:
        raise InputError("The identity embedding is all zeros.", fix="re-enrol the identity.")
    latent = (vector / np.float32(norm)).reshape(1, -1) @ matrix  # (512,) -> (1, 512) @ (512, 512)
    latent /= np.linalg.norm(latent)
    return latent.astype(np.float32, copy=False)


def cached_latent(cache: ModelCache, identity_key: str, embedding: Embedding, swapper: Swapper) -> Latent:
    """The identity's latent for this swapper model, computed once per (identity, model file) pair."""
    key = ("inswapper-latent", identity_key, str(swapper.model_file))

    def load() -> Latent:
        latent = identity_latent(embedding, swapper.emap)
        latent.flags.writeable = False  # shared by every later caller: nobody may change it
        return latent

    return cache.get(key, load)


def swap_crop(
    image: ImageBGR, face: Face, latent: Latent, swapper: Swapper
) -> tuple[ImageBGR, ImageBGR, Affine]:
    """(swapped crop, original crop, affine): the face's ArcFace-aligned crop before and after the swapper."""
    # 1. check inputs
    _check_image(image, "image")
    size = _crop_size(swapper)
    latent = _checked_latent(latent)
    # 2. the aligned crop, as insightface's norm_crop2 cuts it
    affine = estimate_alignment(face.landmarks, size)
    original = warp_to_crop(image, affine, size)
    # 3. one model call
    blob = _prepare_blob(original)
    pred = _forward_inswapper(swapper, blob, latent)
    if pred.shape != blob.shape:
        raise ModelError(
            f"{swapper.model_file}: swapper output of shape {pred.shape} for an input of {blob.shape}.",
            fix="check that the catalogue entry points at an inswapper_128 model.",
        )
    return _normalize_output(pred), original, affine


def refine_face(
    canvas: ImageBGR,
    face: Face,
    latent: Latent,
    swapper: Swapper,
    settings: RefineFaceSettings,
    *,
    upscaler: Upscaler | None = None,
    hook: MaskHook | None = None,
    inplace: bool = False,
) -> tuple[ImageBGR, FaceStats]:
    """The canvas with ``face`` swapped to ``latent``, (upscaled,) blended back; and what it took.

    With ``inplace`` the caller's canvas is changed and returned (no full-canvas copy: the cost follows the
    face's area alone); otherwise a new canvas comes back and ``canvas`` is untouched.
    """
    timings = {"swap": 0.0, "upscale": 0.0, "blend": 0.0}
    # 1. swap on the aligned crop
    start = time.perf_counter()
    crop, original, affine = swap_crop(canvas, face, latent, swapper)
    timings["swap"] = _ms_since(start)
    # 2. upscale the swapped crop when the face is bigger on the canvas than the crop
    reference: ImageBGR | None = original if settings.colour_match or hook is not None else None
    upscaled = _wants_upscale(settings.upscale, face, crop.shape[0], upscaler)
    if upscaled:
        start = time.perf_counter()
        crop, affine, reference = _upscale_crop(canvas, crop, affine, reference, upscaler)
        timings["upscale"] = _ms_since(start)
    # 3. blend back inside the face's region
    start = time.perf_counter()
    result = _blend_in_region(canvas, crop, affine, settings, reference, hook, inplace=inplace)
    timings["blend"] = _ms_since(start)
    logger.debug("face %s refined: crop %d px, %s", face.box, crop.shape[0], timings)
    return result, FaceStats(upscaled=upscaled, crop_size=int(crop.shape[0]), timings=timings)


def _wants_upscale(mode: UpscaleMode, face: Face, crop_size: int, upscaler: Upscaler | None) -> bool:
    """on: always (an upscaler is required); auto: when one is given and the face exceeds the crop."""
    if mode == "on" and upscaler is None:
        raise InputError(
            "Face upscaling is 'on' but no upscaler was loaded.",
            fix="load the catalogued upscaler, or set refine.upscale to 'auto' or 'off'.",
        )
    if mode == "on":
        return True
    return mode == "auto" and upscaler is not None and face.size > crop_size


def _upscale_crop(
    canvas: ImageBGR, crop: ImageBGR, affine: Affine, reference: ImageBGR | None, upscaler: Upscaler | None
) -> tuple[ImageBGR, Affine, ImageBGR | None]:
    """The upscaled crop, its affine, and the colour reference re-cut from the canvas at the new size."""
    if upscaler is None:  # _wants_upscale guarantees one; this keeps the type checker honest
        raise InputError("No upscaler was given.", fix="load the catalogued upscaler.")
    big = upscaler.upscale(crop)
    big_affine = rescale_affine(affine, big.shape[0] / crop.shape[0])
    if reference is not None:  # a sharper reference than the 128-px one resized
        reference = warp_to_crop(canvas, big_affine, big.shape[0])
    return big, big_affine, reference


def _blend_in_region(
    canvas: ImageBGR,
    crop: ImageBGR,
    affine: Affine,
    settings: RefineFaceSettings,
    reference: ImageBGR | None,
    hook: MaskHook | None,
    *,
    inplace: bool,
) -> ImageBGR:
    """``blend_face`` run on the region the blend mask reaches, as its own small canvas, written back.

    ``blend_face`` (through ``paste_back``) copies and resamples the whole canvas it is given; handing it
    just the mask's region keeps both face-sized, so an in-place refine never touches the whole canvas.
    The region is the mask's support, not the crop square (an ellipse spares ~15% of a frontal face's ROI);
    outside it the mask, and so the blend, is exactly zero.
    """
    target = canvas if inplace else canvas.copy()
    region = _mask_region(affine, crop.shape[0], settings.mask, canvas.shape[:2])
    if region is None:
        return target  # the mask lies entirely off the canvas
    x0, y0, x1, y1 = region
    # canvas px -> region px: crop = A @ (p + origin) + t, so the region's translation is t + A @ origin
    region_affine = np.array(affine, dtype=np.float64)  # (2, 3), a fresh copy
    region_affine[:, 2] += region_affine[:, :2] @ np.array([x0, y0], dtype=np.float64)
    view = target[y0:y1, x0:x1]  # HxWx3 uint8 view into the target canvas
    view[...] = blend_face(
        view,
        crop,
        region_affine,
        settings.mask,
        original_crop=reference,
        colour_match=settings.colour_match,
        hook=hook,
    )
    return target


def _mask_region(
    affine: Affine, size: int, mask: MaskSettings, shape: tuple[int, ...]
) -> tuple[int, int, int, int] | None:
    """Canvas ROI (x0, y0, x1, y1), end-exclusive, where the crop's blend mask can be nonzero; None if off."""
    x0, y0, x1, y1 = _mask_support(size, mask)
    # bilinear sampling reaches one crop px beyond the last nonzero mask px
    corners = np.array([[x0 - 1, y0 - 1], [x1 + 1, y0 - 1], [x0 - 1, y1 + 1], [x1 + 1, y1 + 1]], np.float64)
    inverse = cv2.invertAffineTransform(np.asarray(affine, dtype=np.float64))  # (2, 3) crop px -> canvas px
    mapped = corners @ inverse[:, :2].T + inverse[:, 2]  # (4, 2) x, y canvas px
    square = crop_region(affine, size, shape)  # never beyond the crop square's own ROI
    left = max(int(np.floor(mapped[:, 0].min())) - _REGION_PAD, square[0])
    top = max(int(np.floor(mapped[:, 1].min())) - _REGION_PAD, square[1])
    right = min(int(np.ceil(mapped[:, 0].max())) + 1 + _REGION_PAD, square[2])
    bottom = min(int(np.ceil(mapped[:, 1].max())) + 1 + _REGION_PAD, square[3])
    if right <= left or bottom <= top:
        return None
    return left, top, right, bottom


@functools.lru_cache(maxsize=32)
def _mask_support(size: int, mask: MaskSettings) -> tuple[int, int, int, int]:
    """Inclusive crop-px box (x0, y0, x1, y1) holding every nonzero pixel of the base blend mask."""
    weights = crop_mask(size, mask)  # HxW float32; a mask hook only narrows it
    columns = np.flatnonzero(weights.any(axis=0))  # (K,) x of columns with weight
    rows = np.flatnonzero(weights.any(axis=1))  # (K,) y of rows with weight
    return int(columns[0]), int(rows[0]), int(columns[-1]), int(rows[-1])


def _prepare_blob(crop: ImageBGR) -> SwapBlob:
    """HxWx3 uint8 BGR crop -> (1, 3, H, W) float32 RGB in [0, 1], the swapper's target input."""
    rgb = crop[:, :, ::-1]  # HxWx3 BGR -> RGB (reverse the channel axis): model boundary
    chw = rgb.transpose(2, 0, 1)  # HxWx3 -> 3xHxW
    return np.ascontiguousarray(chw[None], dtype=np.float32) * np.float32(1.0 / 255.0)  # -> 1x3xHxW


def _forward_inswapper(swapper: Swapper, blob: SwapBlob, latent: Latent) -> npt.NDArray[np.float32]:
    """One swapper call: (target blob, source latent) -> (1, 3, S, S) float32 RGB about [0, 1]."""
    # input order as insightface's INSwapper: [0] the target image, [1] the source latent
    feeds = {swapper.input_names[0]: blob, swapper.input_names[1]: latent}
    return np.asarray(swapper.session.run(swapper.output_names, feeds)[0])


def _normalize_output(pred: npt.NDArray[np.float32]) -> ImageBGR:
    """(1, 3, S, S) float RGB in [0, 1] -> SxSx3 uint8 BGR, rounded (insightface truncates: -0.5 level)."""
    hwc = pred[0].transpose(1, 2, 0)  # 1x3xSxS -> SxSx3 RGB
    bgr = hwc[:, :, ::-1]  # RGB -> BGR (reverse the channel axis): back from the model boundary
    return np.clip(np.rint(bgr * 255.0), 0, 255).astype(np.uint8)  # a fresh contiguous array


def _crop_size(swapper: Swapper) -> int:
    """The side of the swapper's square aligned crop."""
    width, height = (int(v) for v in swapper.input_size)
    if width != height or width < 16:
        raise ModelError(
            f"{swapper.model_file}: swapper input of {width}x{height} px.",
            fix="use an inswapper model (square aligned crop, e.g. 128 px).",
        )
    return width


def _checked_latent(latent: Latent) -> Latent:
    """The latent as a (1, 512) float32 array, or InputError."""
    array = np.asarray(latent, dtype=np.float32)
    if array.shape != (1, _EMBEDDING_SIZE) or not np.isfinite(array).all():
        raise InputError(
            f"Swapper latent of shape {array.shape} received.",
            fix="make it with identity_latent / cached_latent from the identity's embedding.",
        )
    return array


def _check_image(image: ImageBGR, name: str) -> None:
    """Raise InputError unless ``image`` is HxWx3 uint8."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(
            f"The {name} is {getattr(image, 'dtype', type(image))} of shape {np.shape(image)}.",
            fix="pass an HxWx3 uint8 BGR image.",
        )


def _ms_since(start: float) -> float:
    """Milliseconds elapsed since ``start`` (a ``time.perf_counter()`` reading)."""
    return (time.perf_counter() - start) * 1000.0
