"""Face detection with the tiny SCRFD fixture, filtering, the stable order, and ArcFace embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import skimage.data

from studio.config import DetectConfig, RefineConfig
from studio.errors import ConfigError, InputError, ModelError
from studio.faces.detect import align_crops, detect_faces, embed_crops, embed_faces
from studio.models.runtime import load_insightface_model
from studio.models.tiny.faces import FIXTURE_FACE_BOX, FIXTURE_FACE_KPS
from studio.types import Face

CPU = ["CPUExecutionProvider"]


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector(tiny_kit: Path) -> Any:
    return load_insightface_model(tiny_kit / "insightface" / "tiny_det.onnx", CPU)


@pytest.fixture(scope="module")
def recognizer(tiny_kit: Path) -> Any:
    return load_insightface_model(tiny_kit / "insightface" / "tiny_arcface.onnx", CPU)


def _photo(width: int = 300, height: int = 200, which: str = "astronaut") -> np.ndarray:
    rgb = getattr(skimage.data, which)()  # HxWx3 uint8 RGB
    return np.ascontiguousarray(cv2.resize(rgb, (width, height))[:, :, ::-1])  # RGB -> BGR


def _faint_noise(pixel_std: float) -> np.ndarray:
    """Grey noise just above the fixture's texture gate: its score is well between 0 and 1.

    640 px = det_size, so the detector sees the noise unresampled (resizing would smooth it).
    """
    noise = np.random.default_rng(1).standard_normal((640, 640, 3)) * pixel_std
    return np.clip(np.rint(128 + noise), 0, 255).astype(np.uint8)  # HxWx3 BGR


class FakeDetector:
    """Test double for selection logic only: returns chosen boxes in a chosen (shuffled) order."""

    def __init__(self, boxes: list[tuple[float, float, float, float, float]], with_kps: bool = True) -> None:
        self.boxes = boxes
        self.with_kps = with_kps
        self.prepared: list[dict[str, Any]] = []

    def prepare(self, ctx_id: int, **kwargs: Any) -> None:
        self.prepared.append({"ctx_id": ctx_id, **kwargs})

    def detect(self, img: np.ndarray, input_size: Any = None, max_num: int = 0) -> tuple[Any, Any]:
        det = np.array(self.boxes, dtype=np.float32).reshape(-1, 5)  # (N, 5) x1, y1, x2, y2, score
        centre = (det[:, :2] + det[:, 2:4]) / 2  # (N, 2) x, y
        kps = np.repeat(centre[:, None, :], 5, axis=1) + np.array(FIXTURE_FACE_KPS) - 0.5  # (N, 5, 2)
        return det, (kps.astype(np.float32) if self.with_kps else None)


# --- detection with the real tiny SCRFD -------------------------------------------------------


def test_finds_the_fixture_face_within_3px(detector: Any) -> None:
    image = _photo(300, 200)  # not square: exercises insightface's letterbox
    faces = detect_faces(image, detector, DetectConfig())
    assert len(faces) == 1
    face = faces[0]
    expected = np.array(FIXTURE_FACE_BOX) * [300, 200, 300, 200]
    assert np.abs(np.array(face.box) - expected).max() <= 3.0
    assert face.landmarks.dtype == np.float32 and face.landmarks.shape == (5, 2)
    assert np.abs(face.landmarks - np.array(FIXTURE_FACE_KPS) * [300, 200]).max() <= 3.0
    assert face.score > 0.99


def test_uniform_image_has_no_face(detector: Any) -> None:
    assert detect_faces(np.full((200, 240, 3), 128, np.uint8), detector, DetectConfig()) == ()


def test_min_face_excludes_the_fixture_face(detector: Any) -> None:
    image = _photo(256, 256)  # fixture face side: (0.4 * 256 + 0.5 * 256) / 2 = 115.2 px
    assert len(detect_faces(image, detector, DetectConfig(min_face=115))) == 1
    assert detect_faces(image, detector, DetectConfig(min_face=116)) == ()


def test_threshold_excludes_a_low_score_face(detector: Any) -> None:
    image = _faint_noise(2.9)  # score = sigmoid(400 * (2.9 / 128 - 0.02)) ~ 0.74
    low = detect_faces(image, detector, DetectConfig(threshold=0.5))
    assert len(low) == 1 and 0.5 < low[0].score < 0.95
    assert detect_faces(image, detector, DetectConfig(threshold=0.95)) == ()


def test_detect_settings_are_validated_as_config() -> None:
    config = RefineConfig(detect=DetectConfig(threshold=0.4, det_size=320, min_face=20))
    assert config.detect == DetectConfig(threshold=0.4, det_size=320, min_face=20)
    for bad in ({"det_size": 200}, {"threshold": 0.0}, {"threshold": 1.5}, {"min_face": 0}):
        with pytest.raises(ConfigError, match=f"refine.detect.{next(iter(bad))} has value"):
            DetectConfig(**bad)


def test_rejects_a_non_image(detector: Any) -> None:
    with pytest.raises(InputError, match="HxWx3 uint8"):
        detect_faces(np.zeros((64, 64), np.uint8), detector, DetectConfig())


# --- stable order and filtering (fake detector) -----------------------------------------------


def test_order_is_left_to_right_then_top_to_bottom_then_score() -> None:
    boxes = [
        (300, 50, 400, 150, 0.9),  # centre x 350
        (0, 200, 100, 300, 0.8),  # centre x 50, lower
        (150, 0, 250, 100, 0.7),  # centre x 200
        (0, 0, 100, 100, 0.6),  # centre x 50, upper
        (0, 200, 100, 300, 0.95),  # same box as the second, higher score
        (20, 300, 420, 340, 0.9),  # wide: leftmost edge but centre x 220
    ]
    expected = [(0, 0, 0.6), (0, 200, 0.95), (0, 200, 0.8), (150, 0, 0.7), (20, 300, 0.9), (300, 50, 0.9)]
    image = np.zeros((400, 500, 3), np.uint8)
    for seed in range(5):
        shuffled = [boxes[i] for i in np.random.default_rng(seed).permutation(len(boxes))]
        faces = detect_faces(image, FakeDetector(shuffled), DetectConfig(min_face=10))
        assert [(f.box[0], f.box[1], round(f.score, 2)) for f in faces] == expected


def test_fake_boxes_are_filtered_by_score_and_size() -> None:
    boxes = [(0, 0, 100, 100, 0.3), (200, 0, 220, 20, 0.9), (300, 0, 400, 100, 0.9)]
    faces = detect_faces(np.zeros((200, 500, 3), np.uint8), FakeDetector(boxes), DetectConfig(min_face=32))
    assert [f.box[0] for f in faces] == [300]


def test_detector_prepared_once_per_settings_without_forcing_cpu() -> None:
    fake, image = FakeDetector([(0, 0, 64, 64, 0.9)]), np.zeros((64, 64, 3), np.uint8)
    detect_faces(image, fake, DetectConfig())
    detect_faces(image, fake, DetectConfig())
    assert fake.prepared == [{"ctx_id": 0, "input_size": (640, 640), "det_thresh": 0.5}]
    detect_faces(image, fake, DetectConfig(det_size=320))
    assert len(fake.prepared) == 2 and fake.prepared[1]["input_size"] == (320, 320)


def test_detector_without_landmarks_is_a_model_error() -> None:
    fake = FakeDetector([(0, 0, 64, 64, 0.9)], with_kps=False)
    with pytest.raises(ModelError, match="landmarks"):
        detect_faces(np.zeros((64, 64, 3), np.uint8), fake, DetectConfig())


# --- embeddings -------------------------------------------------------------------------------


def test_embeddings_are_normed_deterministic_and_differ_between_pictures(
    detector: Any, recognizer: Any
) -> None:
    astronaut, coffee = _photo(256, 256), _photo(256, 256, "coffee")
    faces_a = detect_faces(astronaut, detector, DetectConfig())
    faces_c = detect_faces(coffee, detector, DetectConfig())
    first = embed_faces(astronaut, faces_a, recognizer)
    assert first.shape == (1, 512) and first.dtype == np.float32
    assert np.linalg.norm(first, axis=1) == pytest.approx([1.0], abs=1e-5)
    np.testing.assert_array_equal(first, embed_faces(astronaut, faces_a, recognizer))
    other = embed_faces(coffee, faces_c, recognizer)
    assert float(first[0] @ other[0]) < 0.9


def test_batched_embeddings_match_one_by_one(detector: Any, recognizer: Any) -> None:
    images = [_photo(256, 256, which) for which in ("astronaut", "chelsea", "coffee")]
    crops = [align_crops(img, detect_faces(img, detector, DetectConfig()))[0] for img in images]
    assert all(c.shape == (112, 112, 3) and c.dtype == np.uint8 for c in crops)
    batch = embed_crops(crops, recognizer)
    single = np.concatenate([embed_crops([c], recognizer) for c in crops])
    np.testing.assert_allclose(batch, single, atol=1e-5)


def test_no_faces_give_an_empty_embedding_matrix(recognizer: Any) -> None:
    empty = embed_faces(_photo(), (), recognizer)
    assert empty.shape == (0, 512) and empty.dtype == np.float32


def test_recognizer_with_wrong_output_is_a_model_error() -> None:
    class Broken:
        def get_feat(self, imgs: list[np.ndarray]) -> np.ndarray:
            return np.ones((len(imgs), 128), np.float32)

    face = Face(box=(10, 10, 50, 50), landmarks=np.array(FIXTURE_FACE_KPS, np.float32) * 60, score=1.0)
    with pytest.raises(ModelError, match="shape"):
        embed_faces(_photo(), [face], Broken())
