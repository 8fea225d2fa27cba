"""The FaceFusion-format processor twins: real I/O layouts, known fixture outputs, seeded enhancers."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from studio.config import config_dir
from studio.models.tiny.processors import (
    ARCFACE_128,
    BISENET_IO,
    CODEFORMER_IO,
    GFPGAN_IO,
    OCCLUDER_RGB,
    PARSER_FACE,
    PARSER_FEATURES,
    PARSER_REGION_IDS,
    XSEG_IO,
    occluded,
    parser_class_at,
    parser_class_map,
    write_codeformer,
    write_face_parser,
    write_gfpgan,
    write_occluder,
)

CPU = ["CPUExecutionProvider"]
# The FaceFusion 3.x files' signatures: name -> (ONNX type, rank, fixed dims; None = dynamic)
XSEG_SIGNATURE = (
    {"input": ("tensor(float)", [None, 256, 256, 3])},
    {"output": ("tensor(float)", [None, 256, 256, 1])},
)
BISENET_SIGNATURE = (
    {"input": ("tensor(float)", [None, 3, 512, 512])},
    {  # BiSeNet's main head first (FaceFusion reads output 0), then its two auxiliary heads
        "output": ("tensor(float)", [None, 19, 512, 512]),
        "feat_out16": ("tensor(float)", [None, 19, 512, 512]),
        "feat_out32": ("tensor(float)", [None, 19, 512, 512]),
    },
)
GFPGAN_SIGNATURE = (
    {"input": ("tensor(float)", [1, 3, 512, 512])},
    {"output": ("tensor(float)", [1, 3, 512, 512])},
)
CODEFORMER_SIGNATURE = (
    {"input": ("tensor(float)", [1, 3, 512, 512]), "weight": ("tensor(double)", [1])},
    {"output": ("tensor(float)", [1, 3, 512, 512])},
)
SKIN_BGR = (120, 150, 200)  # a light skin tone, BGR as FaceFusion passes its crops


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ort.InferenceSession]:
    folder = tmp_path_factory.mktemp("processors")
    writers: dict[str, Callable[..., None]] = {
        "xseg": write_occluder,
        "bisenet": write_face_parser,
        "gfpgan": write_gfpgan,
        "codeformer": write_codeformer,
    }
    sessions = {}
    for name, write in writers.items():
        write(folder / f"{name}.onnx", seed=7)
        sessions[name] = ort.InferenceSession(str(folder / f"{name}.onnx"), providers=CPU)
    return sessions


def _signature(items: list[Any]) -> dict[str, tuple[str, list[int | None]]]:
    return {i.name: (i.type, [d if isinstance(d, int) else None for d in i.shape]) for i in items}


@pytest.mark.parametrize(
    ("name", "signature"),
    [
        ("xseg", XSEG_SIGNATURE),
        ("bisenet", BISENET_SIGNATURE),
        ("gfpgan", GFPGAN_SIGNATURE),
        ("codeformer", CODEFORMER_SIGNATURE),
    ],
)
def test_twins_have_the_real_layouts(twins: dict, name: str, signature: tuple) -> None:
    session = twins[name]
    assert _signature(session.get_inputs()) == signature[0]
    assert _signature(session.get_outputs()) == signature[1]
    assert list(_signature(session.get_outputs())) == list(signature[1])  # output order too


def test_catalogue_io_is_the_same_for_real_files_and_twins() -> None:
    with open(config_dir() / "models.toml", "rb") as handle:
        real = tomllib.load(handle)
    expected = {"xseg_1": XSEG_IO, "bisenet_resnet_34": BISENET_IO, "gfpgan_1_4": GFPGAN_IO}
    for name, io in {**expected, "codeformer": CODEFORMER_IO}.items():
        assert real[name]["io"] == io, name
    assert real["codeformer"]["licence"].startswith("NTU S-Lab") and not real["codeformer"]["commercial"]
    assert (XSEG_IO["layout"], XSEG_IO["channels"], BISENET_IO["layout"]) == ("NHWC", "BGR", "NCHW")


def test_occluder_marks_exactly_the_occluder_colour(twins: dict) -> None:
    crop = np.empty((256, 256, 3), np.uint8)
    crop[:] = SKIN_BGR
    crop[40:120, 60:160] = OCCLUDER_RGB[::-1]  # a painted green square (BGR)
    crop[200:210, 20:30] = (60, 200, 60)  # on the colour rule's edge: still occluded
    crop[200:210, 40:50] = (61, 200, 60)  # one level too blue: not occluded
    crop[200:210, 60:70] = (60, 199, 60)  # one level too dark: not occluded
    batch = np.stack([crop, np.full_like(crop, 255)]).astype(np.float32) / 255.0
    (mask,) = twins["xseg"].run(None, {"input": batch})
    assert mask.shape == (2, 256, 256, 1) and mask.dtype == np.float32
    assert np.all(mask[0, 40:120, 60:160] == 0.0) and np.all(mask[0, 200:210, 20:30] == 0.0)
    expected = ~occluded(crop[..., ::-1])  # 0 on the occluder colour, exactly 1 elsewhere
    assert np.array_equal(mask[0, ..., 0], expected.astype(np.float32))
    assert np.all(mask[1] == 1.0)


def test_occluder_without_fixture_never_occludes(tmp_path: Path) -> None:
    write_occluder(tmp_path / "none.onnx", fixture="none")
    session = ort.InferenceSession(str(tmp_path / "none.onnx"), providers=CPU)
    green = np.zeros((1, 256, 256, 3), np.float32)
    green[..., 1] = 1.0
    assert np.all(session.run(None, {"input": green})[0] == 1.0)
    with pytest.raises(ValueError, match="occluder fixture"):
        write_occluder(tmp_path / "bad.onnx", fixture="blue")  # type: ignore[arg-type]


def test_parser_regions_sit_where_the_template_puts_them(twins: dict) -> None:
    noise = np.random.default_rng(0).standard_normal((2, 3, 512, 512)).astype(np.float32)
    (logits,) = twins["bisenet"].run(["output"], {"input": noise})
    classes = logits.argmax(1)
    assert logits.shape == (2, 19, 512, 512) and np.array_equal(classes[0], classes[1])  # content-blind
    assert np.array_equal(classes[0], parser_class_map())
    at = {name: PARSER_REGION_IDS[name] for name in ("left-eye", "right-eye", "nose", "mouth", "skin")}
    (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = ARCFACE_128
    points = {
        "left-eye": (lx, ly),
        "right-eye": (rx, ry),
        "nose": (nx, ny - 0.05),
        "mouth": ((mlx + mrx) / 2, (mly + mry) / 2),
        "skin": (0.5, 0.85),
    }
    for name, (x, y) in points.items():
        assert classes[0, int(y * 512), int(x * 512)] == at[name] == parser_class_at(x, y), name
    for corner in ((0, 0), (0, 511), (511, 0), (511, 511)):
        assert classes[0][corner] == 0  # background outside the face ellipse
    for region in PARSER_FEATURES:  # every documented feature is present, inside the face
        ys, xs = np.nonzero(classes[0] == region.class_id)
        assert len(xs) > 50, region.name
        assert abs(xs.mean() / 512 - region.cx) < 0.01 and abs(ys.mean() / 512 - region.cy) < 0.01
        assert PARSER_FACE.contains(region.cx, region.cy)
    left_brow = PARSER_REGION_IDS["left-eyebrow"]
    assert classes[0, int(ly * 512) - 40, int(lx * 512)] == left_brow  # eyebrows above the eyes


def test_enhancers_keep_shape_and_range_and_are_seeded(twins: dict, tmp_path: Path) -> None:
    face = np.random.default_rng(1).uniform(-1, 1, (1, 3, 512, 512)).astype(np.float32)
    weight = {"weight": np.array([0.5], np.float64)}
    for name, extra in (("gfpgan", {}), ("codeformer", weight)):
        session = twins[name]
        (out,) = session.run(None, {"input": face, **extra})
        (again,) = session.run(None, {"input": face, **extra})
        assert out.shape == face.shape and out.dtype == np.float32 and np.array_equal(out, again)
        assert out.min() >= -1.0 and out.max() <= 1.0
        change = np.abs(out - face)
        assert 0.0 < change.mean() < 0.1 and change.max() <= 0.1 + 1e-6, name  # small, but a change
    (flat,) = twins["gfpgan"].run(None, {"input": np.zeros_like(face)})
    (noisy,) = twins["gfpgan"].run(None, {"input": face})
    assert not np.allclose(noisy - face, flat)  # the change depends on the content
    write_gfpgan(tmp_path / "other.onnx", seed=8)
    other = ort.InferenceSession(str(tmp_path / "other.onnx"), providers=CPU)
    assert not np.array_equal(other.run(None, {"input": face})[0], noisy)  # another seed, another change


def test_codeformer_weight_sets_fidelity(twins: dict) -> None:
    face = np.random.default_rng(2).uniform(-0.9, 0.9, (1, 3, 512, 512)).astype(np.float32)
    distance = {}
    for w in (0.0, 0.5, 1.0):
        (out,) = twins["codeformer"].run(None, {"input": face, "weight": np.array([w])})
        distance[w] = float(np.abs(out - face).mean())
    assert distance[1.0] < distance[0.5] < distance[0.0]
    assert distance[1.0] > 0.0 and distance[1.0] / distance[0.0] == pytest.approx(0.2, rel=0.05)


@pytest.mark.parametrize(
    ("write", "seed"),
    [(write_occluder, 0), (write_face_parser, 0), (write_gfpgan, 3), (write_codeformer, 3)],
)
def test_files_are_byte_identical_per_seed(write: Callable[..., None], seed: int, tmp_path: Path) -> None:
    write(tmp_path / "a.onnx", seed=seed)
    write(tmp_path / "b.onnx", seed=seed)
    data = (tmp_path / "a.onnx").read_bytes()
    assert data == (tmp_path / "b.onnx").read_bytes() and len(data) < 300_000
