"""The tiny face models load through insightface 2.1 and behave as their fixtures promise."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from insightface.app import FaceAnalysis
from insightface.app.common import Face
from insightface.model_zoo import get_model
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.inswapper import INSwapper
from insightface.model_zoo.scrfd import SCRFD
from insightface.utils import face_align

from studio.models.tiny.faces import (
    FIXTURE_FACE_BOX,
    FIXTURE_FACE_KPS,
    write_detector,
    write_recognizer,
    write_swapper,
)

CPU = ["CPUExecutionProvider"]
# insightface 2.1's face_align calls SimilarityTransform.estimate, deprecated in scikit-image 0.26.
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")
TOLERANCE_PX = 3.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_faces")
    write_detector(folder / "det.onnx")
    write_recognizer(folder / "rec.onnx")
    write_swapper(folder / "swap.onnx")
    write_swapper(folder / "swap_identity.onnx", identity=True)
    return folder


@pytest.fixture(scope="module")
def detector(model_dir: Path) -> SCRFD:
    model = get_model(str(model_dir / "det.onnx"), providers=CPU)
    # SCRFD.prepare takes ``input_size``; FaceAnalysis.prepare maps its ``det_size`` onto it.
    model.prepare(ctx_id=-1, input_size=(640, 640))
    return model


def _textured(shape: tuple[int, int], seed: int) -> npt.NDArray[np.uint8]:
    """HxWx3 uint8 BGR: noise over a smooth gradient, like a busy photo."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, shape[1], dtype=np.float32)[None, :, None]  # [1,W,1]
    return ((noise.astype(np.float32) + ramp) / 2).astype(np.uint8)


def _expected(shape: tuple[int, int]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Fixture box (4,) and keypoints (5,2) in pixels for a picture of HxW ``shape``."""
    height, width = shape
    box = np.array(FIXTURE_FACE_BOX) * [width, height, width, height]
    return box, np.array(FIXTURE_FACE_KPS) * [width, height]


def _detect_one(detector: SCRFD, img: npt.NDArray[np.uint8]) -> Face:
    """Detect and require exactly one face; return it as insightface's Face."""
    boxes, kpss = detector.detect(img)
    assert boxes.shape == (1, 5), boxes
    assert kpss is not None
    return Face(bbox=boxes[0, :4], kps=kpss[0], det_score=boxes[0, 4])


def _cosine(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize(
    ("filename", "cls"),
    [
        ("det.onnx", SCRFD),
        ("rec.onnx", ArcFaceONNX),
        ("swap.onnx", INSwapper),
        ("swap_identity.onnx", INSwapper),
    ],
)
def test_get_model_routes_each_file_to_its_class(model_dir: Path, filename: str, cls: type) -> None:
    model = get_model(str(model_dir / filename), providers=CPU)
    assert type(model) is cls


def test_models_carry_the_real_preprocessing_and_layouts(model_dir: Path) -> None:
    det = get_model(str(model_dir / "det.onnx"), providers=CPU)
    assert (det.fmc, det._num_anchors, det.use_kps, det.batched) == (3, 2, True, False)
    assert (det.input_mean, det.input_std) == (127.5, 128.0)
    rec = get_model(str(model_dir / "rec.onnx"), providers=CPU)
    assert (rec.input_mean, rec.input_std, rec.input_size) == (127.5, 127.5, (112, 112))
    swap = get_model(str(model_dir / "swap.onnx"), providers=CPU)
    assert swap.input_names == ["target", "source"]
    assert swap.emap.shape == (512, 512) and swap.emap.dtype == np.float32
    np.testing.assert_allclose(swap.emap @ swap.emap.T, np.eye(512), atol=1e-5)
    assert onnx.load(str(model_dir / "swap.onnx")).graph.initializer[-1].name == "emap"


@pytest.mark.parametrize("shape", [(480, 640), (1024, 768), (768, 1024), (512, 512)])
def test_detector_reports_the_fixture_face(detector: SCRFD, shape: tuple[int, int]) -> None:
    face = _detect_one(detector, _textured(shape, seed=1))
    box, kps = _expected(shape)
    assert face.det_score >= 0.9
    np.testing.assert_allclose(face.bbox, box, atol=TOLERANCE_PX)
    np.testing.assert_allclose(face.kps, kps, atol=TOLERANCE_PX)


@pytest.mark.parametrize("input_size", [(128, 128), (320, 320), (640, 480), [(128, 128), (640, 640)]])
def test_detector_reports_the_same_face_at_any_detection_size(model_dir: Path, input_size: Any) -> None:
    det = get_model(str(model_dir / "det.onnx"), providers=CPU)
    det.prepare(ctx_id=-1, input_size=input_size)
    face = _detect_one(det, _textured((480, 640), seed=2))
    box, kps = _expected((480, 640))
    np.testing.assert_allclose(face.bbox, box, atol=TOLERANCE_PX)
    np.testing.assert_allclose(face.kps, kps, atol=TOLERANCE_PX)


def test_detector_works_on_the_dynamic_session_too(model_dir: Path) -> None:
    det = get_model(str(model_dir / "det.onnx"), providers=CPU, static_shape_sessions=False)
    det.prepare(ctx_id=-1, input_size=(640, 640))
    face = _detect_one(det, _textured((1024, 768), seed=3))
    np.testing.assert_allclose(face.bbox, _expected((1024, 768))[0], atol=TOLERANCE_PX)


@pytest.mark.parametrize("value", [0, 128, 255])
def test_detector_reports_no_face_on_a_uniform_picture(detector: SCRFD, value: int) -> None:
    boxes, kpss = detector.detect(np.full((480, 640, 3), value, np.uint8))
    assert boxes.shape == (0, 5)
    assert kpss is not None and kpss.shape == (0, 5, 2)


def test_detector_raw_outputs_have_scrfd_shapes_and_one_hot_score(model_dir: Path) -> None:
    session = ort.InferenceSession(str(model_dir / "det.onnx"), providers=CPU)
    height, width = 480, 640
    img = _textured((height, width), 4)
    blob = cv2.dnn.blobFromImage(img, 1 / 128, (width, height), (127.5,) * 3, swapRB=True)  # [1,3,H,W] RGB
    outs = session.run(None, {session.get_inputs()[0].name: blob})  # 9 arrays, [K,1|4|10] each
    for index, out in enumerate(outs):
        stride = (8, 16, 32)[index % 3]
        assert out.shape == ((height // stride) * (width // stride) * 2, (1, 4, 10)[index // 3])
    scores = np.concatenate(outs[:3])[:, 0]  # [sum K]
    assert np.count_nonzero(scores > 0.5) == 1 and scores.max() >= 0.9
    flat = np.full((1, 3, height, width), 0.2, np.float32)  # uniform grey, normalised
    assert max(float(s.max()) for s in session.run(None, {session.get_inputs()[0].name: flat})[:3]) < 0.01


def test_face_analysis_runs_detector_and_recognizer_with_det_size(model_dir: Path, tmp_path: Path) -> None:
    for name in ("det.onnx", "rec.onnx"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    app = FaceAnalysis(name=str(tmp_path), providers=CPU)
    app.prepare(ctx_id=-1, det_size=(640, 640))
    faces = app.get(_textured((480, 640), seed=5))
    assert len(faces) == 1
    assert faces[0].embedding.shape == (512,) and np.isfinite(faces[0].embedding).all()
    np.testing.assert_allclose(faces[0].bbox, _expected((480, 640))[0], atol=TOLERANCE_PX)


def _aligned_crops(detector: SCRFD, seeds: list[int], size: int = 112) -> list[npt.NDArray[np.uint8]]:
    """Arcface-aligned BGR crops of textured pictures, through the fixture detector."""
    crops = []
    for seed in seeds:
        img = _textured((480, 640), seed)
        crops.append(face_align.norm_crop(img, landmark=_detect_one(detector, img).kps, image_size=size))
    return crops


def test_recognizer_embeddings_are_deterministic_and_distinct(detector: SCRFD, model_dir: Path) -> None:
    rec = get_model(str(model_dir / "rec.onnx"), providers=CPU)
    rec.prepare(ctx_id=-1)
    crop_a, crop_b = _aligned_crops(detector, [10, 11])
    feats = rec.get_feat([crop_a, crop_b, crop_a])
    assert feats.shape == (3, 512) and feats.dtype == np.float32
    np.testing.assert_array_equal(feats[0], feats[2])
    np.testing.assert_array_equal(rec.get_feat(crop_a)[0], feats[0])
    assert _cosine(feats[0], feats[1]) < 0.8


def test_recognizer_flatten_reads_the_spatial_face_map(model_dir: Path) -> None:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_dir / "rec.onnx")))
    (flatten,) = [node for node in model.graph.node if node.op_type == "Flatten"]
    shapes = {info.name: info.type.tensor_type.shape.dim for info in model.graph.value_info}
    dims = [d.dim_value or d.dim_param for d in shapes[flatten.input[0]]]
    assert dims[0] == "N" and dims[2:] == [7, 7] and 16 <= dims[1] <= 64
    producer = next(node for node in model.graph.node if flatten.input[0] in node.output)
    assert producer.op_type == "BatchNormalization"


def _swap(model_dir: Path, filename: str, detector: SCRFD, embedding_seed: int) -> tuple[Any, Any, Any]:
    """Swap a textured picture's fixture face; returns (swapped crop, aligned crop, M), BGR uint8."""
    swapper = get_model(str(model_dir / filename), providers=CPU)
    img = _textured((480, 640), seed=20)
    target = _detect_one(detector, img)
    source = Face(embedding=np.random.default_rng(embedding_seed).standard_normal(512).astype(np.float32))
    swapped, matrix = swapper.get(img, target, source, paste_back=False)
    aligned, _ = face_align.norm_crop2(img, target.kps, 128)
    return swapped, aligned, matrix


def test_identity_swapper_returns_the_aligned_crop(model_dir: Path, detector: SCRFD) -> None:
    swapped, aligned, matrix = _swap(model_dir, "swap_identity.onnx", detector, embedding_seed=0)
    assert swapped.shape == (128, 128, 3) and swapped.dtype == np.uint8 and matrix.shape == (2, 3)
    assert np.abs(swapped.astype(int) - aligned.astype(int)).max() <= 1


def test_swapper_shifts_colours_by_the_source_identity(model_dir: Path, detector: SCRFD) -> None:
    first, aligned, _ = _swap(model_dir, "swap.onnx", detector, embedding_seed=0)
    again, _, _ = _swap(model_dir, "swap.onnx", detector, embedding_seed=0)
    other, _, _ = _swap(model_dir, "swap.onnx", detector, embedding_seed=1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    diff = first.astype(int) - aligned.astype(int)
    assert 0 < np.abs(diff).max() <= 26  # a mild per-channel shift, clipped to 0..255


def test_swapper_graph_identity_mode_is_exact(model_dir: Path) -> None:
    session = ort.InferenceSession(str(model_dir / "swap_identity.onnx"), providers=CPU)
    target = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)  # RGB 0..1
    source = np.random.default_rng(1).standard_normal((1, 512)).astype(np.float32)
    (out,) = session.run(None, {"target": target, "source": source / np.linalg.norm(source)})
    np.testing.assert_array_equal(out, target)


def test_swapper_paste_back_runs(model_dir: Path, detector: SCRFD) -> None:
    swapper = get_model(str(model_dir / "swap.onnx"), providers=CPU)
    img = _textured((480, 640), seed=21)
    source = Face(embedding=np.ones(512, np.float32))
    result = swapper.get(img, _detect_one(detector, img), source, paste_back=True)
    assert result.shape == img.shape and result.dtype == np.uint8 and not np.array_equal(result, img)


WRITERS: dict[str, Callable[..., None]] = {
    "detector": write_detector,
    "recognizer": write_recognizer,
    "swapper": write_swapper,
    "identity swapper": lambda path, seed=0: write_swapper(path, seed=seed, identity=True),
}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_files_are_byte_identical_for_a_seed(tmp_path: Path, kind: str) -> None:
    write = WRITERS[kind]
    write(tmp_path / "a.onnx", seed=7)
    write(tmp_path / "b.onnx", seed=7)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    if kind != "detector":  # the fixture detector has no random weights
        write(tmp_path / "c.onnx", seed=8)
        assert (tmp_path / "a.onnx").read_bytes() != (tmp_path / "c.onnx").read_bytes()


def test_building_all_models_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    for kind, write in WRITERS.items():
        write(tmp_path / f"{kind}.onnx")
    assert time.perf_counter() - start < 2.0
