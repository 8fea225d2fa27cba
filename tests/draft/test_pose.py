"""Tests for studio.draft.pose: keypoints JSON, skeleton images and photos become ControlNet pose images."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from skimage import data as skdata

from studio.draft import pose
from studio.draft.pose import (
    LIMBS,
    PALETTE,
    POSE_SOURCES,
    load_pose,
    pose_from_image,
    pose_from_keypoints,
    pose_from_photo,
)
from studio.errors import InputError, ModelError
from studio.imageio import write_image
from studio.models.cache import ModelCache

W, H = 512, 768
# A standing person in BODY_18 order (x, y px on a 512x768 canvas), limbs far enough apart that every
# limb midpoint and keypoint centre is covered by nothing else.
BODY18 = np.array(
    [
        (256, 100), (256, 200), (176, 200), (146, 320), (136, 430), (336, 200), (366, 320), (376, 430),
        (206, 420), (196, 560), (191, 700), (306, 420), (316, 560), (321, 700),
        (236, 80), (276, 80), (216, 90), (296, 90),
    ],
    dtype=np.float64,
)  # fmt: skip
BLACK = (0, 0, 0)
# The reference, restated independently of the module: controlnet_aux's draw_bodypose limb pairs
# (1-based) and RGB colours; limb i and keypoint i use colour i.
REFERENCE_LIMBS = [
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11),
    (2, 12), (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18),
]  # fmt: skip
REFERENCE_COLOURS = [
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
]  # fmt: skip


def _keypoints(points: np.ndarray, confidence: np.ndarray | None = None) -> list[float]:
    """Flatten (N, 2) points and (N,) confidences into OpenPose's [x1, y1, c1, ...]."""
    conf = np.ones(len(points)) if confidence is None else confidence
    return np.column_stack([points, conf]).ravel().tolist()


def _write_json(path: Path, people: list[list[float]], **extra: Any) -> Path:
    path.write_text(json.dumps({"people": [{"pose_keypoints_2d": p} for p in people], **extra}))
    return path


def _pixel(image: np.ndarray, xy: tuple[float, float]) -> tuple[int, ...]:
    return tuple(int(v) for v in image[round(xy[1]), round(xy[0])])


def _shade(colour: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(c * 3 // 5 for c in colour)  # limbs are drawn at 60 %


def _distance_to_segments(xy: np.ndarray, segments: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """(P,) distance of each (P, 2) pixel to the nearest of the segments."""
    best = np.full(len(xy), np.inf)
    for a, b in segments:
        ab = b - a
        t = np.clip(((xy - a) @ ab) / max(float(ab @ ab), 1e-9), 0, 1)
        best = np.minimum(best, np.linalg.norm(xy - (a + t[:, None] * ab), axis=1))
    return best


@pytest.fixture
def body18_json(tmp_path: Path) -> Path:
    return _write_json(tmp_path / "pose.json", [_keypoints(BODY18)])


# --- keypoints JSON ------------------------------------------------------------------------------


def test_body18_draws_palette_colours_at_points_and_limb_midpoints(body18_json: Path) -> None:
    image = pose_from_keypoints(body18_json, width=W, height=H)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    assert list(PALETTE) == REFERENCE_COLOURS
    assert [(a + 1, b + 1) for a, b in LIMBS] == REFERENCE_LIMBS
    for index, point in enumerate(BODY18):
        assert _pixel(image, point) == REFERENCE_COLOURS[index], f"keypoint {index}"
    assert _pixel(image, BODY18[1]) == (255, 85, 0)  # the neck is palette colour 1, in RGB order
    for index, (a, b) in enumerate(REFERENCE_LIMBS):
        midpoint = (BODY18[a - 1] + BODY18[b - 1]) / 2
        assert _pixel(image, midpoint) == _shade(REFERENCE_COLOURS[index]), f"limb {index}"
    assert _pixel(image, (BODY18[0] + BODY18[1]) / 2) == (0, 0, 153)  # nose-neck: colour 12 at 60 %


def test_body18_background_is_black_away_from_the_skeleton(body18_json: Path) -> None:
    image = pose_from_keypoints(body18_json, width=W, height=H)
    lit = np.argwhere(image.any(axis=2))[:, ::-1].astype(np.float64)  # (P, 2) x, y of non-black pixels
    segments = [(BODY18[a], BODY18[b]) for a, b in LIMBS] + [(p, p) for p in BODY18]
    assert len(lit) > 3000  # 17 sticks ~8 px wide were drawn
    assert _distance_to_segments(lit, segments).max() <= 5.5  # stick half-width / circle radius 4, + AA slack
    assert _pixel(image, (10, 10)) == BLACK and _pixel(image, (256, 400)) == BLACK
    assert _pixel(image, BODY18[1] + (0, 12)) == BLACK  # just below the neck, between the hip limbs


def test_normalised_coordinates_draw_the_same_image(tmp_path: Path, body18_json: Path) -> None:
    confidence = np.ones(18)
    confidence[7] = 0  # a missing point may sit at pixel-like values: it must not defeat the detection
    pixels = BODY18.copy()
    pixels[7] = (376, 430)
    normalised = BODY18 / (W, H)
    normalised[7] = (376, 430)
    a = pose_from_keypoints(
        _write_json(tmp_path / "px.json", [_keypoints(pixels, confidence)]), width=W, height=H
    )
    b = pose_from_keypoints(
        _write_json(tmp_path / "n.json", [_keypoints(normalised, confidence)]), width=W, height=H
    )
    assert a.any()
    np.testing.assert_array_equal(a, b)


def test_normalised_coordinates_refer_to_the_canvas(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "n.json", [_keypoints(BODY18 / (W, H))], canvas_width=W, canvas_height=H)
    reference = _write_json(tmp_path / "px.json", [_keypoints(BODY18)], canvas_width=W, canvas_height=H)
    np.testing.assert_array_equal(
        pose_from_keypoints(path, width=1024, height=1536),
        pose_from_keypoints(reference, width=1024, height=1536),
    )


def test_body25_maps_to_the_same_image_as_body18(tmp_path: Path, body18_json: Path) -> None:
    body25 = np.zeros((25, 2))
    body25[[0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]] = BODY18
    body25[8] = (256, 420)  # MidHip, not in BODY_18
    body25[19:] = [(330, 740), (340, 740), (320, 720), (180, 740), (170, 740), (190, 720)]  # feet
    path = _write_json(tmp_path / "b25.json", [_keypoints(body25)])
    np.testing.assert_array_equal(
        pose_from_keypoints(path, width=W, height=H), pose_from_keypoints(body18_json, width=W, height=H)
    )


def test_two_people_draw_two_skeletons(tmp_path: Path) -> None:
    left = BODY18 * 0.5 + (0, 150)
    right = BODY18 * 0.5 + (256, 150)
    both = pose_from_keypoints(
        _write_json(tmp_path / "2.json", [_keypoints(left), _keypoints(right)]), width=W, height=H
    )
    only_left = pose_from_keypoints(_write_json(tmp_path / "l.json", [_keypoints(left)]), width=W, height=H)
    only_right = pose_from_keypoints(_write_json(tmp_path / "r.json", [_keypoints(right)]), width=W, height=H)
    assert _pixel(both, left[1]) == PALETTE[1] and _pixel(both, right[1]) == PALETTE[1]
    assert not (only_left.any(axis=2) & only_right.any(axis=2)).any()  # disjoint skeletons
    np.testing.assert_array_equal(both, only_left + only_right)


def test_confidence_zero_points_and_their_limbs_are_not_drawn(tmp_path: Path, body18_json: Path) -> None:
    confidence = np.ones(18)
    confidence[[4, 17]] = 0  # right wrist, left ear
    image = pose_from_keypoints(
        _write_json(tmp_path / "c.json", [_keypoints(BODY18, confidence)]), width=W, height=H
    )
    full = pose_from_keypoints(body18_json, width=W, height=H)
    assert _pixel(image, BODY18[4]) == BLACK and _pixel(image, BODY18[17]) == BLACK
    assert _pixel(image, (BODY18[3] + BODY18[4]) / 2) == BLACK  # right forearm
    assert _pixel(image, (BODY18[15] + BODY18[17]) / 2) == BLACK  # left eye - left ear
    assert _pixel(image, BODY18[3]) == PALETTE[3]  # the elbow is still there
    assert 0 < image.any(axis=2).sum() < full.any(axis=2).sum()


def test_canvas_is_scaled_to_the_draft(tmp_path: Path) -> None:
    points = np.zeros((18, 2))
    confidence = np.zeros(18)
    points[0], confidence[0] = (100, 60), 1  # the nose alone
    path = _write_json(
        tmp_path / "c.json", [_keypoints(points, confidence)], canvas_width=256, canvas_height=256
    )
    square = pose_from_keypoints(path, width=512, height=512)
    assert _pixel(square, (200, 120)) == PALETTE[0] and _pixel(square, (100, 60)) == BLACK
    assert np.argwhere(square.any(axis=2)).mean(axis=0).round().tolist() == [120, 200]  # centred there
    tall = pose_from_keypoints(path, width=512, height=768)  # letterboxed: 128 px black above the canvas
    assert np.argwhere(tall.any(axis=2)).mean(axis=0).round().tolist() == [248, 200]


def test_stick_and_circle_scale_with_the_draft_size(tmp_path: Path) -> None:
    points, confidence = np.zeros((18, 2)), np.zeros(18)
    points[0], confidence[0] = (0.5, 0.5), 1
    path = _write_json(tmp_path / "n.json", [_keypoints(points, confidence)])
    small = pose_from_keypoints(path, width=512, height=512).any(axis=2).sum()
    large = pose_from_keypoints(path, width=1024, height=1024).any(axis=2).sum()
    assert 40 <= small <= 60 and 3.5 <= large / small <= 4.5  # radius 4 -> 8


BAD_JSONS = {
    "not json": ("{people: [", "not valid JSON"),
    "array": ("[1, 2]", "JSON array"),
    "no people": ('{"canvas_width": 512, "canvas_height": 512}', 'no "people" key'),
    "people not a list": ('{"people": {"pose_keypoints_2d": []}}', 'object for "people"'),
    "person without keypoints": ('{"people": [{"face_keypoints_2d": []}]}', "pose_keypoints_2d"),
    "17 points": (json.dumps({"people": [{"pose_keypoints_2d": [1.0] * 51}]}), "51 numbers"),
    "not a multiple of 3": (json.dumps({"people": [{"pose_keypoints_2d": [1.0] * 55}]}), "expected 54"),
    "string value": (json.dumps({"people": [{"pose_keypoints_2d": ["1"] + [1.0] * 53}]}), "'1'"),
    "nan value": ('{"people": [{"pose_keypoints_2d": [NaN' + ", 1" * 53 + "]}]}", "finite number"),
    "bad canvas": (
        json.dumps({"people": [{"pose_keypoints_2d": [1.0] * 54}], "canvas_width": -5, "canvas_height": 9}),
        "canvas_width -5",
    ),
    "half a canvas": (
        json.dumps({"people": [{"pose_keypoints_2d": [1.0] * 54}], "canvas_width": 512}),
        "canvas_height None",
    ),
    "nobody": ('{"people": []}', "no keypoint with confidence > 0"),
    "all confidence 0": (
        json.dumps({"people": [{"pose_keypoints_2d": [5.0, 5.0, 0.0] * 18}]}),
        "nothing to draw",
    ),
}


@pytest.mark.parametrize("name", list(BAD_JSONS))
def test_bad_json_raises_input_error_naming_problem_and_format(tmp_path: Path, name: str) -> None:
    text, expected = BAD_JSONS[name]
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InputError) as caught:
        pose_from_keypoints(path, width=W, height=H)
    message = str(caught.value)
    assert expected in message and str(path) in message
    assert "pose_keypoints_2d" in message and "BODY_25" in message  # the expected format is spelled out


def test_missing_json_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        pose_from_keypoints(tmp_path / "nope.json", width=W, height=H)


# --- skeleton images -----------------------------------------------------------------------------


def test_pose_image_is_letterboxed_with_black_padding(tmp_path: Path) -> None:
    bgr = np.zeros((50, 100, 3), np.uint8)  # HxWx3 BGR
    bgr[:, :] = (0, 0, 255)  # red
    path = write_image(tmp_path / "wide.png", bgr)
    image = pose_from_image(path, width=64, height=64, max_pixels=10_000)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert (image[16:48] == (255, 0, 0)).all()  # RGB out: red stays red
    assert not image[:16].any() and not image[48:].any()


def test_pose_image_keeps_a_skeleton_in_place(tmp_path: Path, body18_json: Path) -> None:
    skeleton = pose_from_keypoints(body18_json, width=W, height=H)  # RGB
    path = write_image(tmp_path / "skeleton.png", skeleton[:, :, ::-1])  # RGB -> BGR for imageio
    np.testing.assert_array_equal(pose_from_image(path, width=W, height=H, max_pixels=10**6), skeleton)
    half = pose_from_image(path, width=256, height=384, max_pixels=10**6)
    assert _pixel(half, BODY18[1] / 2) == PALETTE[1]


def test_black_pose_image_is_refused(tmp_path: Path) -> None:
    path = write_image(tmp_path / "black.png", np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(InputError, match="entirely black"):
        pose_from_image(path, width=64, height=64, max_pixels=10**6)


# --- dispatch ------------------------------------------------------------------------------------


@pytest.fixture
def no_controlnet_aux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "controlnet_aux", None)  # import raises ImportError, installed or not


@pytest.fixture
def astronaut_png(tmp_path: Path) -> Path:
    return write_image(tmp_path / "astronaut.png", skdata.astronaut()[:, :, ::-1])  # RGB -> BGR


def _load(spec: Path, **kwargs: Any) -> np.ndarray:
    return load_pose(spec, width=W, height=H, max_pixels=10**6, detector_dir=None, **kwargs)


def test_auto_sends_json_to_keypoints(body18_json: Path) -> None:
    np.testing.assert_array_equal(_load(body18_json), pose_from_keypoints(body18_json, width=W, height=H))


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_auto_takes_a_black_background_skeleton_as_pose_image(
    tmp_path: Path, body18_json: Path, no_controlnet_aux: None, suffix: str
) -> None:
    skeleton = pose_from_keypoints(body18_json, width=W, height=H)
    path = write_image(tmp_path / f"skeleton{suffix}", skeleton[:, :, ::-1])  # RGB -> BGR
    np.testing.assert_array_equal(_load(path), pose_from_image(path, width=W, height=H, max_pixels=10**6))


def test_auto_sends_a_photo_to_openpose_with_install_instructions(
    astronaut_png: Path, no_controlnet_aux: None
) -> None:
    with pytest.raises(ModelError) as caught:
        _load(astronaut_png)
    message = str(caught.value)
    assert "controlnet_aux" in message and "uv pip install controlnet-aux==0.0.10" in message
    assert "pip install 'portrait-studio[pose]'" in message
    assert "lllyasviel/Annotators" in message and "body_pose_model.pth" in message
    assert str(astronaut_png) in message


def test_auto_takes_a_dark_grey_picture_for_a_photo(tmp_path: Path, no_controlnet_aux: None) -> None:
    bgr = np.zeros((200, 200, 3), np.uint8)  # HxWx3 BGR: 90 % black, a dim grey figure
    bgr[60:80, 50:150] = np.linspace(40, 200, 100, dtype=np.uint8)[None, :, None]
    path = write_image(tmp_path / "night.png", bgr)
    with pytest.raises(ModelError, match="controlnet_aux"):
        _load(path)


def test_forced_sources(astronaut_png: Path, body18_json: Path, no_controlnet_aux: None) -> None:
    assert set(POSE_SOURCES) == {"auto", "image", "keypoints", "photo"}
    photo_as_image = _load(astronaut_png, source="image")  # taken as is, letterboxed
    assert photo_as_image[:128].max() == 0 and photo_as_image[128:640].mean() > 50
    with pytest.raises(ModelError, match="controlnet-aux"):
        pose_from_photo(astronaut_png, width=W, height=H, max_pixels=10**6, detector_dir=None)
    with pytest.raises(InputError, match="is not JSON text"):
        _load(astronaut_png, source="keypoints")
    with pytest.raises(InputError, match="'skeleton'"):
        _load(body18_json, source="skeleton")  # type: ignore[arg-type]


# --- photos with a stand-in controlnet_aux ------------------------------------------------------


class _Keypoint(NamedTuple):
    x: float
    y: float


class _FakeDetector:
    """Stands in for controlnet_aux.OpenposeDetector: records where it loaded from, finds BODY18."""

    sources: list[str] = []  # noqa: RUF012 - shared record for the test

    @classmethod
    def from_pretrained(cls, source: str) -> _FakeDetector:
        cls.sources.append(source)
        return cls()

    def detect_poses(self, rgb: np.ndarray, include_hand: bool, include_face: bool) -> list[Any]:
        assert rgb.shape[2] == 3 and min(rgb.shape[:2]) == 512 and not include_hand and not include_face
        keypoints = [_Keypoint(x / W, y / H) for x, y in BODY18]
        keypoints[4] = None  # the right wrist not found
        return [types.SimpleNamespace(body=types.SimpleNamespace(keypoints=keypoints))]


@pytest.fixture
def fake_controlnet_aux(monkeypatch: pytest.MonkeyPatch) -> type[_FakeDetector]:
    _FakeDetector.sources = []
    monkeypatch.setitem(sys.modules, "controlnet_aux", types.SimpleNamespace(OpenposeDetector=_FakeDetector))
    return _FakeDetector


def test_photo_keypoints_are_drawn_like_a_keypoints_json(
    tmp_path: Path, fake_controlnet_aux: type[_FakeDetector]
) -> None:
    photo = write_image(tmp_path / "photo.png", np.full((H, W, 3), 128, np.uint8))
    folder = tmp_path / "annotators"
    folder.mkdir()
    for name in ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"):
        (folder / name).write_bytes(b"weights")
    cache = ModelCache()
    first = load_pose(photo, width=W, height=H, max_pixels=10**6, detector_dir=folder, cache=cache)
    second = pose_from_photo(photo, width=W, height=H, max_pixels=10**6, detector_dir=folder, cache=cache)
    confidence = np.ones(18)
    confidence[4] = 0
    expected = pose_from_keypoints(
        _write_json(tmp_path / "p.json", [_keypoints(BODY18, confidence)]), width=W, height=H
    )
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected)
    assert fake_controlnet_aux.sources == [str(folder)]  # loaded once, from the folder


def test_detector_folder_without_weights_names_the_missing_files(
    tmp_path: Path, astronaut_png: Path, fake_controlnet_aux: type[_FakeDetector]
) -> None:
    with pytest.raises(ModelError, match=r"lacks body_pose_model\.pth, hand_pose_model\.pth, facenet\.pth"):
        pose_from_photo(astronaut_png, width=W, height=H, max_pixels=10**6, detector_dir=tmp_path)
    assert fake_controlnet_aux.sources == []


def test_photo_without_people_is_an_input_error(
    astronaut_png: Path, fake_controlnet_aux: type[_FakeDetector], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pose, "_forward_openpose", lambda detector, rgb: [])
    with pytest.raises(InputError, match="no person"):
        pose_from_photo(astronaut_png, width=W, height=H, max_pixels=10**6, detector_dir=None)
    assert fake_controlnet_aux.sources == ["lllyasviel/Annotators"]


def test_the_studio_takes_the_annotator_from_the_catalogue(
    tmp_path: Path, fake_controlnet_aux: type[_FakeDetector], tiny_overrides: list[str]
) -> None:
    from dataclasses import replace

    from studio.config import load_config
    from studio.errors import LicenceError, ModelNotFoundError
    from studio.models import open_catalogue
    from studio.prepare import build_draft_request
    from studio.request import GenerateRequest

    config = load_config("tiny", overrides=tiny_overrides)
    catalogue = open_catalogue(config)
    assert {catalogue[n].kind for n in ("openpose_body", "openpose_hand", "openpose_face")} == {"annotator"}
    photo = write_image(tmp_path / "photo.png", np.full((H, W, 3), 128, np.uint8))
    request = GenerateRequest("x", pose=photo, pose_source="photo", width=W, height=H)
    with pytest.raises(ModelNotFoundError, match=r"'openpose_body'.*studio models pull openpose_body"):
        build_draft_request(request, catalogue, config, ModelCache())
    strict = replace(config, commercial=True)  # CMU's OpenPose licence is non-commercial
    with pytest.raises(LicenceError, match="openpose_body has licence 'CMU OpenPose"):
        build_draft_request(request, catalogue, strict, ModelCache())
    keypoints = _write_json(tmp_path / "p.json", [_keypoints(BODY18)])  # no annotator needed for these
    draft, _ = build_draft_request(
        replace(request, pose=keypoints, pose_source="auto"), catalogue, strict, ModelCache()
    )
    assert draft.control is not None and fake_controlnet_aux.sources == []
