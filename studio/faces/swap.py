"""Swap a face to an identity with inswapper: one aligned crop, one model call, a blend in the face's region.

The identity enters the swapper as a *latent*: the identity's normed ArcFace embedding times the model's
``emap`` (its last initializer), renormalised. It depends only on the identity and the model file, so it is
computed once per pair and cached. The swap itself runs on the 128-px ArcFace-aligned crop of the target
face; an optional Real-ESRGAN pass sharpens the swapped crop before it is blended back. Every step after
the model call works on the crop or on the face's region of the canvas, never on the whole canvas.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from studio.config import RefineConfig, Toggle
from studio.errors import InputError, ModelError
from studio.faces.blend import blend_face
from studio.geometry import estimate_alignment, rescale_affine, warp_to_crop
from studio.imageio import planes_to_bgr
from studio.models.cache import ModelCache
from studio.types import Affine, Embedding, Face, ImageBGR

if TYPE_CHECKING:
    from studio.faces.upscale import Upscaler

logger = logging.getLogger(__name__)

Latent = npt.NDArray[np.float32]  # (1, 512) float32, L2-normed: normed embedding @ emap, renormalised
SwapBlob = npt.NDArray[np.float32]  # (1, 3, S, S) float32 RGB in [0, 1], NCHW

_EMBEDDING_SIZE = 512


class Swapper(Protocol):
    """What the studio needs of insightface's ``INSwapper`` (``load_insightface_model`` returns one)."""

    model_file: str
    session: Any  # onnxruntime.InferenceSession
    emap: npt.NDArray[np.float32]  # (512, 512): the graph's last initializer
    input_names: list[str]  # from the session: [target image, source latent]
    output_names: list[str]
    input_size: tuple[int, int]  # (width, height) of the aligned crop, (128, 128) for inswapper_128


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
    size = swap_size(swapper)
    # 2. the aligned crop, as insightface's norm_crop2 cuts it
    affine = estimate_alignment(face.landmarks, size)
    original = warp_to_crop(image, affine, size)
    # 3. one model call
    return swap_aligned(original, latent, swapper), original, affine


def swap_aligned(original: ImageBGR, latent: Latent, swapper: Swapper) -> ImageBGR:
    """The swapper's output for an already aligned crop (side ``swap_size``): one model call."""
    latent = _checked_latent(latent)
    blob = _prepare_blob(original)
    pred = _forward_inswapper(swapper, blob, latent)
    if pred.shape != blob.shape:
        raise ModelError(
            f"{swapper.model_file}: swapper output of shape {pred.shape} for an input of {blob.shape}.",
            fix="check that the catalogue entry points at an inswapper_128 model.",
        )
    return _normalize_output(pred)


def refine_face(
    canvas: ImageBGR,
    face: Face,
    latent: Latent,
    swapper: Swapper,
    settings: RefineConfig,
    *,
    upscaler: Upscaler | None = None,
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
    reference: ImageBGR | None = original if settings.colour_match else None
    upscaled = wants_upscale(settings.upscale, face, crop.shape[0], upscaler)
    if upscaled:
        start = time.perf_counter()
        crop, affine, reference = _upscale_crop(canvas, crop, affine, reference, upscaler)
        timings["upscale"] = _ms_since(start)
    # 3. blend back inside the region the blend mask reaches (paste_back touches nothing else)
    start = time.perf_counter()
    result = blend_face(
        canvas,
        crop,
        affine,
        settings.mask,
        original_crop=reference,
        colour_match=settings.colour_match,
        inplace=inplace,
    )
    timings["blend"] = _ms_since(start)
    logger.debug("face %s refined: crop %d px, %s", face.box, crop.shape[0], timings)
    return result, FaceStats(upscaled=upscaled, crop_size=int(crop.shape[0]), timings=timings)


def wants_upscale(mode: Toggle, face: Face, crop_size: int, upscaler: Upscaler | None) -> bool:
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
    if upscaler is None:  # wants_upscale guarantees one; this keeps the type checker honest
        raise InputError("No upscaler was given.", fix="load the catalogued upscaler.")
    big = upscaler.upscale(crop)
    big_affine = rescale_affine(affine, big.shape[0] / crop.shape[0])
    if reference is not None:  # a sharper reference than the 128-px one resized
        reference = warp_to_crop(canvas, big_affine, big.shape[0])
    return big, big_affine, reference


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
    return planes_to_bgr(pred[0])  # 3xSxS RGB -> SxSx3 BGR, contiguous


def swap_size(swapper: Swapper) -> int:
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
