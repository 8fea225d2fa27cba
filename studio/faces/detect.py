"""Face detection (insightface SCRFD) and ArcFace embeddings, in a stable left-to-right order.

Faces come back sorted left to right by box centre (ties: top to bottom, then higher score), so face
indices mean the same thing on every run and ``0=anna,1=kenji`` maps people to slots reliably.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from studio.adapter.tokens import FaceTokenEncoder, Tokens
from studio.config import DetectConfig
from studio.errors import InputError, ModelError
from studio.geometry import estimate_alignment, warp_to_crop
from studio.types import Face, ImageBGR

logger = logging.getLogger(__name__)

ARCFACE_SIZE = 112  # px: ArcFace recognizers take 112x112 crops aligned to the arcface template
EMBEDDING_SIZE = 512
_PREPARED_ATTR = "_studio_prepared"  # (det_size, threshold) the detector was last prepared with
_MIN_NORM = 1e-6  # an embedding shorter than this carries no direction
_SAME_MODEL_COSINE = 0.999  # token encoder and recognizer embeddings of one crop agree this well


# --- detection --------------------------------------------------------------------------------


def face_order_key(face: Face) -> tuple[float, float, float]:
    """Sort key of the stable order: box centre x, then centre y, then higher score first."""
    x1, y1, x2, y2 = face.box
    return (x1 + x2) / 2, (y1 + y2) / 2, -face.score


def detect_faces(image: ImageBGR, detector: Any, settings: DetectConfig) -> tuple[Face, ...]:
    """Faces in ``image`` at or above the threshold and minimum size, sorted left to right."""
    # 1. check inputs and prepare the detector once per size and threshold
    _check_image(image)
    _prepare_detector(detector, settings)
    # 2. run SCRFD
    boxes, points = _forward_scrfd(detector, image, settings.det_size)
    # 3. keep confident, large enough faces, in the stable order
    found = [
        Face(box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])), landmarks=p, score=float(b[4]))
        for b, p in zip(boxes, points, strict=True)
    ]
    kept = [f for f in found if f.score >= settings.threshold and f.size >= settings.min_face]
    logger.debug(
        "detected %d face(s), kept %d (threshold %.2f, min_face %d px)",
        len(found),
        len(kept),
        settings.threshold,
        settings.min_face,
    )
    return tuple(sorted(kept, key=face_order_key))


def _prepare_detector(detector: Any, settings: DetectConfig) -> None:
    """Set the detector's input size and score floor, once per (det_size, threshold) on that object."""
    wanted = (settings.det_size, settings.threshold)
    if getattr(detector, _PREPARED_ATTR, None) == wanted:
        return
    # ctx_id=0, not -1: insightface's prepare(ctx_id<0) switches the session to the CPU provider, which
    # would silently undo a requested CUDA provider. Providers are chosen when the model is loaded.
    detector.prepare(
        ctx_id=0, input_size=(settings.det_size, settings.det_size), det_thresh=settings.threshold
    )
    setattr(detector, _PREPARED_ATTR, wanted)


def _forward_scrfd(
    detector: Any, image: ImageBGR, det_size: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Run SCRFD: boxes (N, 5) x1, y1, x2, y2, score in image px and landmarks (N, 5, 2) x, y px."""
    boxes, points = detector.detect(image, input_size=(det_size, det_size), max_num=0)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)  # (N, 5) x1, y1, x2, y2, score
    if points is None:
        raise ModelError(
            "The face detector returned no landmarks; the studio needs 5 landmarks per face to align it.",
            fix="use an SCRFD model with keypoints (e.g. det_10g.onnx from buffalo_l).",
        )
    points = np.asarray(points, dtype=np.float32).reshape(-1, 5, 2)  # (N, 5, 2) x, y px
    if len(points) != len(boxes):
        raise ModelError(f"The face detector returned {len(boxes)} boxes but {len(points)} landmark sets.")
    return boxes, points


def _check_image(image: object) -> None:
    """Raise InputError unless ``image`` is a non-empty HxWx3 uint8 array."""
    is_array = isinstance(image, np.ndarray) and image.ndim == 3
    if is_array and image.shape[2] == 3 and image.dtype == np.uint8 and 0 not in image.shape:
        return
    shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", None)
    raise InputError(
        f"Received a {type(image).__name__} of shape {shape}, dtype {dtype}; expected HxWx3 uint8 BGR.",
        fix="read pictures with studio.imageio.read_image.",
    )


# --- embeddings -------------------------------------------------------------------------------


def align_crops(image: ImageBGR, faces: Sequence[Face], size: int = ARCFACE_SIZE) -> list[ImageBGR]:
    """ArcFace-aligned ``size`` x ``size`` BGR crops of ``faces``, in the same order."""
    _check_image(image)
    return [warp_to_crop(image, estimate_alignment(face.landmarks, size), size) for face in faces]


def embed_crops(crops: Sequence[ImageBGR], recognizer: Any) -> npt.NDArray[np.float32]:
    """L2-normed ArcFace embeddings (N, 512) float32 of aligned 112-px BGR crops, one batch."""
    if not crops:
        return np.zeros((0, EMBEDDING_SIZE), dtype=np.float32)
    raw = _forward_arcface(recognizer, crops)  # (N, 512) float32, not normed
    if raw.shape != (len(crops), EMBEDDING_SIZE):
        raise ModelError(
            f"The recognizer returned embeddings of shape {raw.shape} for {len(crops)} crop(s); "
            f"expected ({len(crops)}, {EMBEDDING_SIZE}).",
            fix="check the refine.recognizer catalogue entry points at an ArcFace model (e.g. w600k_r50).",
        )
    return _normalize_rows(raw)


def embed_faces(image: ImageBGR, faces: Sequence[Face], recognizer: Any) -> npt.NDArray[np.float32]:
    """L2-normed ArcFace embeddings (N, 512) float32 of ``faces`` in ``image``, one batch."""
    return embed_crops(align_crops(image, faces), recognizer)


def _forward_arcface(recognizer: Any, crops: Sequence[ImageBGR]) -> npt.NDArray[np.float32]:
    """Run the recognizer on a batch of aligned BGR crops (it swaps to RGB itself): (N, 512) float32."""
    return np.asarray(recognizer.get_feat(list(crops)), dtype=np.float32)


def _normalize_rows(raw: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Rows scaled to unit length; a non-finite or zero row is a model error."""
    norms = np.linalg.norm(raw.astype(np.float64), axis=1, keepdims=True)  # (N, 1)
    if not np.isfinite(raw).all() or (norms < _MIN_NORM).any():
        raise ModelError(
            "The recognizer returned a non-finite or zero embedding.",
            fix="check the recognizer model file (studio models verify) and the runtime provider.",
        )
    return (raw / norms).astype(np.float32)  # (N, 512) float32, L2-normed


# --- face-adapter tokens ----------------------------------------------------------------------


def crop_tokens(
    crops: Sequence[ImageBGR],
    recognizer: Any,
    embeddings: npt.NDArray[np.float32],
    encoder: FaceTokenEncoder | None = None,
) -> Tokens | None:
    """Face-adapter tokens (N, T, C) of aligned crops, or None if the recognizer cannot give them.

    ``encoder`` defaults to one built from the recognizer's own ONNX file and providers (insightface's
    ArcFaceONNX keeps both). Its embeddings must agree with ``embeddings`` (N, 512), the recognizer's:
    tokens from another model would mean nothing to an adapter trained on this one.
    """
    encoder = encoder or _encoder_for(recognizer)
    if encoder is None or not crops:
        return None
    tokens, check = encoder.encode(crops)  # (N, T, C), (N, 512) L2-normed
    cosines = np.einsum("nd,nd->n", check.astype(np.float64), embeddings.astype(np.float64))  # (N,)
    if cosines.min() < _SAME_MODEL_COSINE:
        raise ModelError(
            f"The face-token encoder {encoder.model_path.name} is not the recognizer that made the "
            f"embeddings (cosine {cosines.min():.3f} on the same crop).",
            fix="build the token encoder from the refine.recognizer model file.",
        )
    return tokens


def _encoder_for(recognizer: Any) -> FaceTokenEncoder | None:
    """A token encoder on the recognizer's own ONNX file and providers; None if it has none or no tokens."""
    model_file, session = getattr(recognizer, "model_file", None), getattr(recognizer, "session", None)
    if model_file is None or session is None:
        return None
    try:
        return FaceTokenEncoder(Path(model_file), session.get_providers())
    except ModelError as err:
        logger.warning("no face-adapter tokens from %s: %s", Path(model_file).name, err)
        return None
