"""Content checks: NudeNet 320n on images (the optional `safety` extra) and blocked terms on prompts.

One interface serves every image check: an ``HxWx3 uint8 BGR`` image in, the reasons it is blocked out
(``()`` passes) — ``studio.qa.ContentCheck``. :func:`content_check` builds it from ``config.safety``:

- ``checker = "none"``: returns ``None``; the caller runs its own placeholder (``studio.qa.no_content_check``,
  which says so in every run's notes). This module does not import ``studio.qa`` (a higher layer).
- ``checker = "nudenet"``: a :class:`NudeNetCheck` on the studio's own ONNX Runtime session (so
  ``runtime.onnx_providers`` and ``runtime.threads`` are honoured; nudenet's ``NudeDetector`` ignores them).
  Its file is the catalogue entry ``safety.model``, found in the model folders or else inside the installed
  nudenet wheel, and always checked against the catalogue's sha256 and size.

When the checker cannot be built (the extra is not installed, the file is missing or corrupt, the catalogue
entry is absent, ONNX Runtime cannot open it or run it): with ``safety.required = true`` every image fails
closed with the reason (:class:`UnavailableCheck`), so a campaign records each item as blocked and why; with
``required = false`` the error is raised (a ``ModelError`` with the fix): the user asked for a checker, so
the studio never runs on silently without one. Mistakes in the settings themselves (an unknown class in
``blocked_classes``, a licence the ``commercial`` policy refuses) are raised in both cases.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from studio.config import SafetyConfig, StudioConfig
from studio.errors import (
    ChecksumError,
    ConfigError,
    InputError,
    LicenceError,
    ModelError,
    ModelNotFoundError,
    StudioError,
)
from studio.files import sha256_file
from studio.models.cache import ModelCache
from studio.models.catalogue import Catalogue
from studio.models.resolve import ResolvedModel, resolve
from studio.models.runtime import create_session, onnx_providers
from studio.types import ImageBGR, ModelKind

logger = logging.getLogger(__name__)

# nudenet 3.4.2's class list (nudenet/nudenet.py ``__labels``), in the model's output order; the ONNX file's
# own metadata (``names``) lists the same 18 classes.
NUDENET_CLASSES: tuple[str, ...] = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)  # fmt: skip
# the catalogue kind of content-check models (until studio.types has a "safety" kind)
SAFETY_KIND: ModelKind = "safety"
EXTRA_FIX = (
    "install the `safety` extra (`uv sync --extra safety`, which ships NudeNet's 320n.onnx), or run "
    '`studio models pull nudenet_320n`; or set safety.checker = "none".'
)
_RUN_FIX = (
    "check runtime.onnx_providers and the model file; safety.required = true blocks each image whose "
    "check fails instead of stopping."
)
_WHEEL = "nudenet"  # the package whose wheel carries the model file (found without importing it)
_CANDIDATE_SCORE = 0.2  # nudenet keeps an anchor whose best class score reaches this ...
_NMS_SCORE = 0.25  # ... and NMS drops boxes below this (both lowered to safety.threshold when it is lower)
_NMS_IOU = 0.45
_BOX = 4  # cx, cy, w, h before the class scores in each output row

Channels = Literal["RGB", "BGR"]
Blob = npt.NDArray[np.float32]  # 1x3xSxS float32 0..1, the network input
ContentCheck = Callable[[ImageBGR], tuple[str, ...]]  # as studio.qa.ContentCheck: reasons, () passes


@dataclass(frozen=True)
class ContentVerdict:
    """One content check's result: passed, the reasons it did not, the scores behind them."""

    passed: bool
    reasons: tuple[str, ...]
    scores: Mapping[str, float]  # class -> its highest detection score (detected classes: score >= 0.25)
    checker: str  # e.g. "nudenet:nudenet_320n"


@dataclass(frozen=True)
class Detection:
    """One NudeNet detection, in image pixels."""

    label: str  # one of NUDENET_CLASSES
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in px (nudenet reports x, y, w, h)


class NudeNetCheck:
    """NudeNet 320n on one ORT session: ``check(image)`` gives the reasons an image is blocked."""

    def __init__(self, session: Any, model: ResolvedModel, safety: SafetyConfig) -> None:
        _check_classes(safety.blocked_classes)
        self.session = session  # onnxruntime.InferenceSession, built by create_session
        self.model = model
        self.name = f"nudenet:{model.label}"
        self._size, self._channels = _input_facts(model)
        self._input = session.get_inputs()[0].name
        self._threshold = safety.threshold
        self._blocked = frozenset(safety.blocked_classes)
        self._required = safety.required

    def __call__(self, image: ImageBGR) -> tuple[str, ...]:
        """The reasons ``image`` is blocked (``()``: it passes) — the ContentCheck interface."""
        return self.verdict(image).reasons

    def verdict(self, image: ImageBGR) -> ContentVerdict:
        """The verdict on ``image`` with the highest score of every detected class."""
        try:
            detections = self.detect(image)
        except InputError:
            raise
        except Exception as err:  # ORT raises its own exception types, all plain Exceptions
            if not self._required:
                raise ModelError(f"{self.name}: the content check failed: {err}.", fix=_RUN_FIX) from err
            reason = f"nudenet: check failed, blocked because safety.required = true ({err})"
            return ContentVerdict(False, (reason,), MappingProxyType({}), self.name)
        scores: dict[str, float] = {}
        for found in detections:
            scores[found.label] = max(scores.get(found.label, 0.0), found.score)
        blocked = sorted(
            ((score, label) for label, score in scores.items() if label in self._blocked),
            reverse=True,
        )
        reasons = tuple(
            f"nudenet: {label} {score:.2f} >= {self._threshold:.2f}"
            for score, label in blocked
            if score >= self._threshold
        )
        rounded = {label: round(score, 4) for label, score in scores.items()}
        return ContentVerdict(not reasons, reasons, MappingProxyType(rounded), self.name)

    def detect(self, image: ImageBGR) -> list[Detection]:
        """Every detection nudenet 3.4.2's decoding keeps (scores below the threshold included)."""
        _check_image(image)
        height, width = image.shape[:2]
        blob = _prepare_nudenet(image, self._size, self._channels)
        output = _forward_nudenet(self.session, self._input, blob)
        floor = min(_NMS_SCORE, self._threshold)
        return _postprocess_nudenet(output, width, height, self._size, floor)


class UnavailableCheck:
    """The check that stands in for one that could not be built (safety.required = true): blocks all."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.name = "nudenet:unavailable"

    def __call__(self, image: ImageBGR) -> tuple[str, ...]:
        """Always the one reason: nothing passes without a working checker."""
        return (self.reason,)

    def verdict(self, image: ImageBGR) -> ContentVerdict:
        """A failed verdict with the reason and no scores."""
        return ContentVerdict(False, (self.reason,), MappingProxyType({}), self.name)


def content_check(config: StudioConfig, catalogue: Catalogue, cache: ModelCache) -> ContentCheck | None:
    """The image check ``config.safety`` asks for; None for checker "none" (the caller's placeholder)."""
    # 1. nothing asked for, or settings that are wrong whatever is installed
    safety = config.safety
    if safety.checker == "none":
        return None
    _check_classes(safety.blocked_classes)
    # 2. the model file and its session (one per file, providers and threads), or the reason there is none
    try:
        model = locate_nudenet(config, catalogue)
        providers, threads = onnx_providers(config.runtime.onnx_providers), config.runtime.threads
        key = ("nudenet", model.sha256, tuple(providers), threads)
        session = cache.get(key, lambda: create_session(model.path, providers, threads))
        return NudeNetCheck(session, model, safety)
    except (ConfigError, LicenceError):
        raise
    except Exception as err:  # ORT raises its own exception types, all plain Exceptions
        if not safety.required:
            if isinstance(err, StudioError):
                raise
            raise ModelError(f"The NudeNet content check cannot be built: {err}.", fix=EXTRA_FIX) from err
        reason = f"nudenet: checker unavailable, blocked because safety.required = true ({err})"
        logger.error("%s", reason)
        return UnavailableCheck(reason)


def locate_nudenet(config: StudioConfig, catalogue: Catalogue) -> ResolvedModel:
    """``safety.model`` resolved (licence policy applied), else the verified copy in the nudenet wheel."""
    name = config.safety.model
    try:
        return resolve(name, SAFETY_KIND, config, catalogue)
    except (LicenceError, ChecksumError):
        raise
    except ModelError as err:
        entry = catalogue.get(name)
        if entry is None or entry.kind != SAFETY_KIND:
            raise
        bundled = _bundled_file(entry.filename)
        if bundled is None:
            problem = f"{err.problem} No installed nudenet wheel has it either."
            raise ModelNotFoundError(problem, fix=EXTRA_FIX) from err
    if bundled.stat().st_size != entry.size or sha256_file(bundled) != entry.sha256:
        raise ChecksumError(
            f"{bundled} (in the installed nudenet wheel) does not match catalogue entry {name!r} "
            f"(sha256 {entry.sha256[:12]}…, {entry.size} bytes).",
            fix="install the pinned extra (`uv sync --extra safety`: nudenet==3.4.2), or fix the catalogue.",
        )
    logger.info("%s: using %s from the installed nudenet wheel", name, bundled)
    return ResolvedModel(
        name, SAFETY_KIND, str(bundled), entry.sha256, entry.licence, entry.commercial, entry
    )


def prompt_check(text: str, blocked_terms: Sequence[str]) -> tuple[str, ...]:
    """The blocked terms ``text`` contains as whole words, any case (multi-word terms allowed)."""
    reasons: list[str] = []
    for term in blocked_terms:
        words = term.split()
        if not words:
            continue
        # a word's edges are anything but a letter or digit ("_" too: booru tags), and the words of a
        # multi-word term may be joined by spaces, "_" or "-": "bare breasts" matches "Bare_Breasts"
        pattern = r"(?<![^\W_])" + r"[\s_-]+".join(re.escape(word) for word in words) + r"(?![^\W_])"
        reason = f"prompt: blocked term {term.strip()!r}"
        if re.search(pattern, text, flags=re.IGNORECASE) and reason not in reasons:
            reasons.append(reason)
    return tuple(reasons)


def content_verdict(check: ContentCheck, image: ImageBGR) -> ContentVerdict:
    """The verdict of any ContentCheck: its own (with scores) where it gives one, else from its reasons."""
    verdict = getattr(check, "verdict", None)
    if callable(verdict):
        return verdict(image)
    reasons = tuple(check(image))
    name = str(getattr(check, "name", getattr(check, "__name__", type(check).__name__)))
    return ContentVerdict(not reasons, reasons, MappingProxyType({}), name)


def _check_classes(classes: Sequence[str]) -> None:
    unknown = [name for name in classes if name not in NUDENET_CLASSES]
    if unknown:
        raise ConfigError(
            f"safety.blocked_classes has {', '.join(map(repr, unknown))}, which NudeNet does not detect.",
            fix=f"use classes from: {', '.join(NUDENET_CLASSES)}.",
        )


def _check_image(image: Any) -> None:
    shape = getattr(image, "shape", None)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or shape[2] != 3:
        raise InputError(
            f"The content check got {getattr(image, 'dtype', type(image))} of shape {shape}.",
            fix="pass an HxWx3 uint8 BGR image (studio.imageio.read_image gives one).",
        )
    if min(shape[:2]) < 1:
        raise InputError(f"The content check got an empty image of shape {shape}.", fix="pass a picture.")


def _input_facts(model: ResolvedModel) -> tuple[int, Channels]:
    """The network's input side and channel order, from the catalogue entry's io (320, RGB otherwise)."""
    facts: Mapping[str, Any] = model.entry.io if model.entry is not None else {}
    size, channels = facts.get("size", 320), facts.get("channels", "RGB")
    if not isinstance(size, int) or size < 32 or size % 32 or channels not in ("RGB", "BGR"):
        raise ModelError(
            f"Catalogue entry {model.label} has io.size = {size!r}, io.channels = {channels!r}.",
            fix='use io.size = a multiple of 32 (320 for 320n) and io.channels = "RGB" or "BGR".',
        )
    return size, channels


def _bundled_file(filename: str) -> Path | None:
    """``filename`` inside the installed nudenet package (not imported), or None."""
    spec = importlib.util.find_spec(_WHEEL)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    found = [Path(folder) / filename for folder in folders if (Path(folder) / filename).is_file()]
    return found[0] if found else None


def _prepare_nudenet(image: ImageBGR, size: int, channels: Channels) -> Blob:
    """nudenet 3.4.2's letterbox: zero-pad right and bottom to a square, resize to ``size``, scale to 0..1.

    The channel order is the catalogue's (RGB for 320n). nudenet 3.4.2 itself feeds BGR by accident: its
    ``cv2.cvtColor(mat, COLOR_RGBA2BGR)`` swaps R and B of a 3-channel image and
    ``blobFromImage(swapRB=True)`` swaps them back. The model is an Ultralytics YOLOv8 export, trained on
    RGB (nudenet 3.0 converted BGR→RGB), and faces score higher on RGB (scikit-image astronaut 0.81 vs 0.72,
    Grace Hopper 0.76 vs 0.61). ``io.channels = "BGR"`` reproduces nudenet 3.4.2's numbers exactly.
    """
    height, width = image.shape[:2]
    side = max(height, width)
    square = cv2.copyMakeBorder(
        image, 0, side - height, 0, side - width, cv2.BORDER_CONSTANT, value=(0, 0, 0)
    )
    resized = cv2.resize(square, (size, size), interpolation=cv2.INTER_LINEAR)  # SxSx3 uint8 BGR
    if channels == "RGB":
        resized = resized[:, :, ::-1]  # BGR -> RGB (model boundary)
    chw = resized.transpose(2, 0, 1)  # SxSx3 -> 3xSxS
    return np.ascontiguousarray(chw[np.newaxis], dtype=np.float32) * np.float32(1 / 255)  # 1x3xSxS 0..1


def _forward_nudenet(session: Any, input_name: str, blob: Blob) -> npt.NDArray[np.float32]:
    """The raw YOLOv8 head: (1, 4 + classes, anchors) float32."""
    return session.run(None, {input_name: blob})[0]


def _postprocess_nudenet(
    output: npt.NDArray[np.float32], width: int, height: int, size: int, floor: float
) -> list[Detection]:
    """nudenet 3.4.2's decoding: best class per anchor, boxes to image px and clipped, class-agnostic NMS."""
    rows = output[0].T  # (4 + C, N) -> (N, 4 + C): cx, cy, w, h in input px, then C class scores
    class_scores = rows[:, _BOX:]  # (N, C)
    best = class_scores.max(axis=1)  # (N,)
    keep = best >= min(_CANDIDATE_SCORE, floor)
    labels, best, boxes = class_scores[keep].argmax(axis=1), best[keep], rows[keep, :_BOX].astype(np.float64)
    scale = max(width, height) / size  # input px -> image px (the pad is right/bottom: no offset)
    x = (boxes[:, 0] - boxes[:, 2] / 2) * scale  # (K,) left
    y = (boxes[:, 1] - boxes[:, 3] / 2) * scale  # (K,) top
    x, y = np.clip(x, 0, width), np.clip(y, 0, height)
    w = np.minimum(boxes[:, 2] * scale, width - x)  # (K,) clipped as nudenet does: the right edge only
    h = np.minimum(boxes[:, 3] * scale, height - y)
    xywh = np.stack([x, y, w, h], axis=1)  # (K, 4) x, y, w, h px
    kept = cv2.dnn.NMSBoxes(xywh.tolist(), best.tolist(), floor, _NMS_IOU) if len(best) else ()
    return [
        Detection(
            NUDENET_CLASSES[int(labels[i])],
            float(best[i]),
            (float(x[i]), float(y[i]), float(x[i] + w[i]), float(y[i] + h[i])),
        )
        for i in np.asarray(kept, dtype=int).reshape(-1)
    ]
