"""ControlNet pose conditioning for the draft stage: a keypoints JSON, a skeleton image or a photo.

Every source ends as what ControlNet openpose models (``control_v11p_sd15_openpose``) were trained on:
HxWx3 uint8 RGB at the draft size, black background, the 17 BODY_18 limbs as ellipses at 60 % of their
colour and the 18 keypoints as filled circles, drawn as controlnet_aux 0.0.10 ``draw_bodypose`` does
(stick width and circle radius 4 px at 512 px, scaled with the draft's short side). Keypoints JSON:
OpenPose format, BODY_18 or BODY_25 (mapped to 18), pixel or normalised coordinates, several people,
body only (hand/face keypoints ignored). Photos: OpenPose body keypoints from controlnet_aux (optional).
Every canvas (the JSON's ``canvas_width`` x ``canvas_height``, else the draft size; the image; the photo)
is letterboxed: scaled uniformly to fit, centred, padded with black, never stretched.
Callers hand the result to diffusers as ``PIL.Image.fromarray(pose)``.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias, get_args

import cv2
import numpy as np
import numpy.typing as npt

from studio.errors import InputError, ModelError
from studio.imageio import read_image
from studio.models.cache import ModelCache
from studio.types import ImageBGR, ImageRGB, PoseSource

logger = logging.getLogger(__name__)

POSE_SOURCES: tuple[PoseSource, ...] = get_args(PoseSource)

Keypoints18: TypeAlias = npt.NDArray[np.float64]  # (18, 3) x, y, confidence per BODY_18 point
_PointsPx: TypeAlias = npt.NDArray[np.int64]  # (18, 2) x, y in draft pixels
_Visible: TypeAlias = npt.NDArray[np.bool_]  # (18,) True where a point is drawn

# BODY_18 (OpenPose COCO) order: 0 nose, 1 neck, 2-4 right shoulder/elbow/wrist, 5-7 left shoulder/
# elbow/wrist, 8-10 right hip/knee/ankle, 11-13 left hip/knee/ankle, 14/15 right/left eye, 16/17 right/
# left ear. Limbs (0-based pairs) and colours (RGB) are those of controlnet_aux 0.0.10 draw_bodypose,
# itself from lllyasviel/ControlNet's annotator: limb i is drawn in colour i at 60 %, point i in colour i.
LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
# BODY_25 adds MidHip (8) and six foot points (19-24); the other 18 are BODY_18's, in BODY_18 order.
_BODY25_TO_18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
_POINT_COUNTS = (18, 25)

_BASE_SIDE = 512  # the annotator's stick width and circle radius are meant for 512 px pictures
_STICK_WIDTH = 4  # half-thickness of a limb ellipse at 512 px
_CIRCLE_RADIUS = 4  # keypoint radius at 512 px
_COORD_LIMIT = 1 << 20  # keypoints are clipped to +-this many px so OpenCV's int32 maths never overflows

_NEAR_BLACK = 24  # a pixel whose brightest channel is at most this is background (leaves room for JPEG noise)
_SKELETON_BLACK_SHARE = 0.8  # a skeleton image is at least this much background ...
_SKELETON_COLOUR_SHARE = 0.5  # ... and at least this much of the rest is strongly coloured
_CLASSIFY_PIXELS = 1 << 20  # classify from a subsample of about this many pixels

_DETECT_SIDE = 512  # the photo's short side for OpenPose (controlnet_aux's default detect_resolution)
_ANNOTATOR_REPO = "lllyasviel/Annotators"
_ANNOTATOR_FILES = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")  # from_pretrained loads all
_INSTALL = "uv pip install controlnet-aux==0.0.10 (or pip install 'portrait-studio[pose]')"
_WEIGHTS = f"the OpenPose annotator weights from {_ANNOTATOR_REPO} ({', '.join(_ANNOTATOR_FILES)})"

_MAX_JSON_BYTES = 16 * 1024 * 1024  # an OpenPose file is a few KB; refuse anything absurd before reading
_JSON_FORMAT = (
    'give OpenPose JSON: {"people": [{"pose_keypoints_2d": [x1, y1, c1, x2, y2, c2, ...]}], '
    '"canvas_width": W, "canvas_height": H} with 18 points (BODY_18/COCO, 54 numbers) or 25 points '
    "(BODY_25, 75 numbers) per person, in pixels of the canvas or normalised to 0..1; the canvas "
    "fields are optional (default: the draft size)."
)


# --- public entries -----------------------------------------------------------------------------
def load_pose(
    spec: str | Path,
    *,
    width: int,
    height: int,
    max_pixels: int,
    detector_dir: Path | Callable[[], Path] | None,
    source: PoseSource = "auto",
    cache: ModelCache | None = None,
) -> ImageRGB:
    """The pose image for ``spec``: ``.json`` keypoints, a black-background skeleton image, or a photo."""
    # 1. check inputs
    path = Path(spec)
    _check_draft_size(width, height)
    if source not in POSE_SOURCES:
        raise InputError(
            f"Pose source {source!r} is not known; expected one of {', '.join(POSE_SOURCES)}.",
            fix="use 'auto' to decide by file type and content.",
        )
    # 2. keypoints are known by their extension
    if source == "keypoints" or (source == "auto" and path.suffix.lower() == ".json"):
        return pose_from_keypoints(path, width=width, height=height)
    # 3. any other file is an image, read once: a drawn skeleton is used as is, a photo goes to OpenPose
    image = read_image(path, max_pixels=max_pixels)
    if source == "auto":
        source = "image" if _looks_like_skeleton(image) else "photo"
        logger.info("pose %s looks like a %s", path, "skeleton image" if source == "image" else "photo")
    if source == "image":
        return _pose_image_to_draft(image, path, width, height)
    return _photo_to_pose(image, path, width, height, detector_dir, cache)


def pose_from_image(path: Path, *, width: int, height: int, max_pixels: int) -> ImageRGB:
    """A ready skeleton image, letterboxed (uniform scale, centred, black padding) to width x height."""
    _check_draft_size(width, height)
    image = read_image(Path(path), max_pixels=max_pixels)
    return _pose_image_to_draft(image, Path(path), width, height)


def pose_from_keypoints(path: Path, *, width: int, height: int) -> ImageRGB:
    """Draw an OpenPose keypoints JSON (BODY_18 or BODY_25) as the ControlNet openpose skeleton image."""
    # 1. read and validate the file
    _check_draft_size(width, height)
    path = Path(path)
    data = _read_json(path)
    canvas = _canvas_size(data, path) or (float(width), float(height))
    people = [_to_pixels(points, canvas) for points in _parse_people(data, path)]
    # 2. refuse a pose with nothing to draw: ControlNet would steer towards an empty picture
    if not any((points[:, 2] > 0).any() for points in people):
        raise InputError(
            f"{path} has {len(people)} people but no keypoint with confidence > 0: nothing to draw.",
            fix="export the pose again from a picture where the person is visible; " + _JSON_FORMAT,
        )
    logger.debug("pose %s: %d people on a %gx%g canvas", path, len(people), *canvas)
    # 3. draw, letterboxing the canvas into the draft
    return _render_people(people, canvas, width, height)


def pose_from_photo(
    path: Path,
    *,
    width: int,
    height: int,
    max_pixels: int,
    detector_dir: Path | Callable[[], Path] | None,
    cache: ModelCache | None = None,
) -> ImageRGB:
    """Detect the people's pose in a photo with controlnet_aux's OpenPose and draw it as a skeleton image."""
    _check_draft_size(width, height)
    image = read_image(Path(path), max_pixels=max_pixels)
    return _photo_to_pose(image, Path(path), width, height, detector_dir, cache)


# --- fitting any canvas into the draft ----------------------------------------------------------
def _check_draft_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or not 8 <= value <= 16384:
            raise InputError(
                f"Pose {name} {value!r} is not allowed: expected a whole number of pixels from 8 to 16384.",
                fix="pass the draft's width and height, e.g. 512 and 768.",
            )


def _fit(canvas: tuple[float, float], width: int, height: int) -> tuple[float, int, int, int, int]:
    """Uniform scale, scaled size (w, h) and top-left offset (x, y) that centre ``canvas`` in the draft."""
    scale = min(width / canvas[0], height / canvas[1])
    new_w = min(width, max(1, round(canvas[0] * scale)))
    new_h = min(height, max(1, round(canvas[1] * scale)))
    return scale, new_w, new_h, (width - new_w) // 2, (height - new_h) // 2


def _letterbox(image: ImageBGR, width: int, height: int) -> ImageBGR:
    """Scale ``image`` uniformly to fit width x height, centred on black."""
    src_h, src_w = image.shape[:2]
    _, new_w, new_h, left, top = _fit((float(src_w), float(src_h)), width, height)
    shrink = new_w < src_w or new_h < src_h
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    canvas = np.zeros((height, width, 3), np.uint8)  # HxWx3 uint8 BGR, black padding
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas


# --- skeleton images ----------------------------------------------------------------------------
def _pose_image_to_draft(image: ImageBGR, path: Path, width: int, height: int) -> ImageRGB:
    if int(image.max()) <= _NEAR_BLACK:
        raise InputError(
            f"Pose image {path} is entirely black: it holds no skeleton to steer the draft with.",
            fix="pass the skeleton image itself (coloured limbs on black), a keypoints JSON, or a photo.",
        )
    fitted = _letterbox(image, width, height)  # HxWx3 uint8 BGR
    return np.ascontiguousarray(fitted[:, :, ::-1])  # BGR -> RGB for ControlNet (model boundary)


def _looks_like_skeleton(image: ImageBGR) -> bool:
    """True for an OpenPose-style drawing: mostly near-black, and what is lit is strongly coloured."""
    step = max(1, math.isqrt(image.shape[0] * image.shape[1] // _CLASSIFY_PIXELS))
    sample = image[::step, ::step].astype(np.int16)  # hxwx3 int16 BGR, room for differences
    brightest, darkest = sample.max(axis=2), sample.min(axis=2)  # hxw each
    dark = brightest <= _NEAR_BLACK
    if dark.mean() < _SKELETON_BLACK_SHARE:
        return False
    lit_max, lit_min = brightest[~dark], darkest[~dark]
    if lit_max.size == 0:
        return True  # all black: taken as an (empty) skeleton, which pose_from_image then refuses
    # palette colours have one channel at 0: saturation (max - min) / max stays high, even anti-aliased
    coloured = (lit_max - lit_min) * 2 >= lit_max
    return bool(coloured.mean() >= _SKELETON_COLOUR_SHARE)


# --- keypoints JSON -----------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            raw = handle.read(_MAX_JSON_BYTES + 1)
    except OSError as err:
        problem = "does not exist" if isinstance(err, FileNotFoundError) else f"cannot be read ({err})"
        raise InputError(f"Keypoints file {path} {problem}.", fix="check the path; " + _JSON_FORMAT) from err
    if len(raw) > _MAX_JSON_BYTES:
        raise InputError(f"Keypoints file {path} is over {_MAX_JSON_BYTES} bytes.", fix=_JSON_FORMAT)
    try:
        data = json.loads(raw.decode("utf-8-sig"))  # -sig: some editors write a BOM
    except UnicodeDecodeError as err:
        raise InputError(f"Keypoints file {path} is not JSON text (not UTF-8).", fix=_JSON_FORMAT) from err
    except json.JSONDecodeError as err:
        raise InputError(
            f"Keypoints file {path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}.",
            fix=_JSON_FORMAT,
        ) from err
    if not isinstance(data, dict):
        raise InputError(
            f'Keypoints file {path} holds a JSON {_json_type(data)}; expected an object with "people".',
            fix=_JSON_FORMAT,
        )
    return data


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _is_number(value: object) -> bool:
    """True for a finite JSON number (not a boolean, NaN, Infinity or an int beyond float range)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return abs(value) < 1e300 if isinstance(value, int) else math.isfinite(value)


def _canvas_size(data: dict[str, Any], path: Path) -> tuple[float, float] | None:
    """(width, height) the keypoints refer to, or None when the file gives no canvas."""
    raw = (data.get("canvas_width"), data.get("canvas_height"))
    if raw == (None, None):
        return None
    if not all(_is_number(value) and value >= 1 for value in raw):
        raise InputError(
            f"Keypoints file {path} has canvas_width {raw[0]!r} and canvas_height {raw[1]!r}; expected "
            "two positive numbers: the pixel size of the picture the keypoints were taken from.",
            fix="give both, or leave both out to draw on the draft size. " + _JSON_FORMAT,
        )
    return float(raw[0]), float(raw[1])


def _parse_people(data: dict[str, Any], path: Path) -> list[Keypoints18]:
    people = data.get("people")
    if not isinstance(people, list):
        found = 'no "people" key' if "people" not in data else f'a {_json_type(people)} for "people"'
        raise InputError(f"Keypoints file {path} has {found}; expected a list of people.", fix=_JSON_FORMAT)
    return [_parse_person(person, index, path) for index, person in enumerate(people)]


def _parse_person(person: object, index: int, path: Path) -> Keypoints18:
    """One person's ``pose_keypoints_2d`` as (18, 3) BODY_18 rows, whatever the file's layout."""
    values = person.get("pose_keypoints_2d") if isinstance(person, dict) else None
    where = f"Keypoints file {path}, people[{index}]"
    if not isinstance(values, list):
        raise InputError(f'{where} has no "pose_keypoints_2d" list.', fix=_JSON_FORMAT)
    bad = [value for value in values if not _is_number(value)]
    if bad:
        raise InputError(
            f"{where} holds {bad[0]!r}; every keypoint value must be a finite number.", fix=_JSON_FORMAT
        )
    count, rest = divmod(len(values), 3)
    if rest or count not in _POINT_COUNTS:
        raise InputError(
            f"{where} has {len(values)} numbers in pose_keypoints_2d; expected 54 (BODY_18/COCO as used by"
            " ControlNet: 18 x (x, y, confidence)) or 75 (BODY_25). COCO-17 (no neck) is not supported.",
            fix=_JSON_FORMAT,
        )
    points = np.asarray(values, np.float64).reshape(count, 3)  # (N, 3) x, y, confidence
    return points[list(_BODY25_TO_18)] if count == 25 else points


def _to_pixels(points: Keypoints18, canvas: tuple[float, float]) -> Keypoints18:
    """Scale normalised keypoints (every confident x, y <= 1) to canvas pixels; pixel ones pass through."""
    confident = points[points[:, 2] > 0, :2]  # (K, 2) x, y of the points that will be drawn
    if confident.size == 0 or confident.max() > 1.0:
        return points
    return points * np.array([canvas[0], canvas[1], 1.0])  # (18, 3) x px, y px, confidence


# --- drawing ------------------------------------------------------------------------------------
def _render_people(
    people: Sequence[Keypoints18], canvas: tuple[float, float], width: int, height: int
) -> ImageRGB:
    """Draw every person, limbs then points, on black; canvas pixels are letterboxed into the draft."""
    scale, _, _, left, top = _fit(canvas, width, height)
    short_side = min(width, height)
    stick = max(1, round(_STICK_WIDTH * short_side / _BASE_SIDE))
    radius = max(1, round(_CIRCLE_RADIUS * short_side / _BASE_SIDE))
    image = np.zeros((height, width, 3), np.uint8)  # HxWx3 uint8 RGB (palette order), black background
    for points in people:
        # (18, 2) draft px, snapped to whole pixels once so pixel and normalised input draw the same
        xy = np.floor(points[:, :2] * scale + (left, top) + 0.5)
        xy = np.clip(xy, -_COORD_LIMIT, _COORD_LIMIT).astype(np.int64)
        visible = points[:, 2] > 0
        _draw_limbs(image, xy, visible, stick)
        _draw_points(image, xy, visible, radius)
    return image


def _draw_limbs(image: ImageRGB, xy: _PointsPx, visible: _Visible, stick: int) -> None:
    for (a, b), colour in zip(LIMBS, PALETTE[: len(LIMBS)], strict=True):
        if not (visible[a] and visible[b]):
            continue
        (x0, y0), (x1, y1) = xy[a].tolist(), xy[b].tolist()
        length = math.hypot(x1 - x0, y1 - y0)
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        centre = ((x0 + x1) // 2, (y0 + y1) // 2)
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), stick), int(angle), 0, 360, 1)
        shade = tuple(channel * 3 // 5 for channel in colour)  # limbs at 60 % of the palette colour
        cv2.fillConvexPoly(image, polygon, shade)


def _draw_points(image: ImageRGB, xy: _PointsPx, visible: _Visible, radius: int) -> None:
    for index in np.flatnonzero(visible).tolist():
        x, y = xy[index].tolist()
        cv2.circle(image, (x, y), radius, PALETTE[index], thickness=-1)


# --- photos (controlnet_aux OpenPose, optional) -------------------------------------------------
def _photo_to_pose(
    image: ImageBGR,
    path: Path,
    width: int,
    height: int,
    detector_dir: Path | Callable[[], Path] | None,
    cache: ModelCache | None,
) -> ImageRGB:
    # 1. the detector first: a missing package is the first thing to fix
    detector = _load_detector(path, detector_dir, cache)
    # 2. detect on a copy with a 512 px short side (what the annotator expects; bounds its memory)
    people = _forward_openpose(detector, _prepare_photo(image))
    if not people:
        raise InputError(
            f"OpenPose found no person in the photo {path}.",
            fix="use a photo showing the person's upper body, or pass a keypoints JSON or a skeleton image.",
        )
    # 3. normalised keypoints -> photo pixels, drawn letterboxed like any other canvas
    canvas = (float(image.shape[1]), float(image.shape[0]))
    logger.info("pose from photo %s: %d people", path, len(people))
    scaled = [points * np.array([canvas[0], canvas[1], 1.0]) for points in people]  # (18, 3) px, px, conf
    return _render_people(scaled, canvas, width, height)


def _prepare_photo(image: ImageBGR) -> ImageRGB:
    height, width = image.shape[:2]
    scale = min(_DETECT_SIDE / min(height, width), 4 * _DETECT_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    return np.ascontiguousarray(resized[:, :, ::-1])  # BGR -> RGB: the annotator takes RGB (model boundary)


def _load_detector(
    path: Path, detector_dir: Path | Callable[[], Path] | None, cache: ModelCache | None
) -> Any:
    """controlnet_aux's OpenposeDetector from ``detector_dir`` or the Hugging Face cache, loaded once."""
    try:
        from controlnet_aux import OpenposeDetector
    except ImportError as err:
        raise ModelError(
            f"Extracting a pose from the photo {path} needs the optional package controlnet_aux, which "
            f"cannot be imported ({err}).",
            fix=f"install it: {_INSTALL}; put {_WEIGHTS} in the detector folder or the Hugging Face cache. "
            "Or pass a keypoints JSON or a ready skeleton image (source 'keypoints' or 'image') instead.",
        ) from err
    if callable(detector_dir):  # resolved only now that a photo needs it (catalogue, checksums, licence)
        detector_dir = detector_dir()
    if detector_dir is not None:
        _check_detector_dir(Path(detector_dir))
    source = str(detector_dir) if detector_dir is not None else _ANNOTATOR_REPO
    if cache is None:
        return _open_detector(OpenposeDetector, source)
    return cache.get(("openpose-detector", source), lambda: _open_detector(OpenposeDetector, source))


def _check_detector_dir(folder: Path) -> None:
    missing = [name for name in _ANNOTATOR_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelError(
            f"Detector folder {folder} lacks {', '.join(missing)}; OpenPose needs {_WEIGHTS}.",
            fix=f"download them from https://huggingface.co/{_ANNOTATOR_REPO} into {folder}, or leave the "
            "detector folder unset to use the Hugging Face cache.",
        )


def _open_detector(detector_cls: Any, source: str) -> Any:
    try:
        # torch >= 2.6 (the project's pin) makes controlnet_aux's torch.load weights-only: no unpickling
        return detector_cls.from_pretrained(source)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as err:
        raise ModelError(
            f"Could not load the OpenPose annotator from {source}: {err}",
            fix=f"put {_WEIGHTS} in the detector folder, or run once online so they reach the Hugging Face "
            "cache (offline, HF_HUB_OFFLINE=1 uses only the cache).",
        ) from err


def _forward_openpose(detector: Any, rgb: ImageRGB) -> list[Keypoints18]:
    """OpenPose body keypoints per person, normalised to the image (x / W, y / H), confidence 1 or 0."""
    poses = detector.detect_poses(rgb, include_hand=False, include_face=False)
    people = []
    for pose in poses:
        points = np.zeros((18, 3))  # (18, 3) x, y normalised, confidence (0 = not found)
        for index, keypoint in enumerate(pose.body.keypoints[:18]):
            if keypoint is not None:
                points[index] = (keypoint.x, keypoint.y, 1.0)
        people.append(points)
    return people
