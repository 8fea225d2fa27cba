"""Face tokens from the recognizer's last spatial map, and their place in the identity file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import pytest
import skimage.data
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

from studio.adapter.tokens import FaceTokenEncoder, identity_condition
from studio.config import DetectConfig, EnrolConfig, RefineConfig
from studio.errors import IdentityError, InputError, ModelError
from studio.faces.detect import align_crops, detect_faces
from studio.faces.identity import IdentityLibrary
from studio.files import sha256_file
from studio.imageio import read_image, write_image
from studio.models.runtime import load_insightface_model
from studio.models.tiny.faces import write_recognizer

CPU = ["CPUExecutionProvider"]
RECOGNIZER_SHA = "ab" * 32


@pytest.fixture(scope="module")
def recognizer_path(tiny_kit: Path) -> Path:
    return tiny_kit / "insightface" / "tiny_arcface.onnx"


@pytest.fixture(scope="module")
def encoder(recognizer_path: Path) -> FaceTokenEncoder:
    return FaceTokenEncoder(recognizer_path, CPU)


def _crops(count: int = 3, seed: int = 0) -> list[np.ndarray]:
    """Aligned-size 112x112 BGR crops: real picture content at different offsets."""
    photo = np.ascontiguousarray(skimage.data.astronaut()[:, :, ::-1])  # HxWx3 RGB -> BGR
    rng = np.random.default_rng(seed)
    return [
        np.ascontiguousarray(photo[y : y + 112, x : x + 112])
        for y, x in rng.integers(0, 400, size=(count, 2))
    ]


# --- the encoder ------------------------------------------------------------------------------


def test_tokens_are_the_7x7_map_and_embeddings_match_insightface(
    encoder: FaceTokenEncoder, recognizer_path: Path
) -> None:
    crops = _crops()
    tokens, embeddings = encoder.encode(crops)
    assert encoder.token_shape == (49, 32) and tokens.shape == (3, 49, 32) and tokens.dtype == np.float32
    reference = load_insightface_model(recognizer_path, CPU).get_feat(crops)  # (3, 512) not normed
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(embeddings, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)
    assert not np.allclose(tokens[0], tokens[1])


def test_tokens_are_laid_out_row_major_so_the_head_reproduces_the_embedding(
    encoder: FaceTokenEncoder, recognizer_path: Path
) -> None:
    tokens, embeddings = encoder.encode(_crops(2))
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(recognizer_path)).graph.initializer}
    feature_map = tokens.reshape(2, 7, 7, 32).transpose(0, 3, 1, 2)  # [N, H*W, C] -> [N, C, H, W]
    fc = feature_map.reshape(2, -1) @ weights["fc.weight"].T + weights["fc.bias"]  # Flatten -> Gemm
    scale = weights["features.weight"] / np.sqrt(weights["features.running_var"] + 1e-5)
    raw = (fc - weights["features.running_mean"]) * scale + weights["features.bias"]  # BatchNormalization
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), embeddings, atol=1e-5)


def test_the_model_file_is_not_changed(recognizer_path: Path) -> None:
    before = sha256_file(recognizer_path)
    FaceTokenEncoder(recognizer_path, CPU)
    assert sha256_file(recognizer_path) == before


def test_bad_crops_are_refused_and_no_crops_give_empty_arrays(encoder: FaceTokenEncoder) -> None:
    with pytest.raises(InputError, match="expected 112x112x3 uint8"):
        encoder.encode([np.zeros((128, 128, 3), np.uint8)])
    tokens, embeddings = encoder.encode([])
    assert tokens.shape == (0, 49, 32) and embeddings.shape == (0, 512)


def _tail_graph(path: Path, *, between: str | None = None, head: str = "Flatten") -> Path:
    """w600k_r50's tail at toy width: Conv -> PRelu -> BN -> Flatten -> Gemm -> BN (features)."""
    rng = np.random.default_rng(0)
    const = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.1, name)
        for name, shape in [("conv_w", (8, 3, 16, 16)), ("slope", (8, 1, 1)), ("fc_w", (512, 392))]
    ]
    const += [
        numpy_helper.from_array(np.full(n, v, np.float32), f"{p}_{k}")
        for p, n in (("bn", 8), ("feat", 512))
        for k, v in (("scale", 1.2), ("bias", 0.1), ("mean", 0.0), ("var", 1.0))
    ]
    const.append(numpy_helper.from_array(np.zeros(512, np.float32), "fc_b"))
    const.append(numpy_helper.from_array(np.array([0, -1], np.int64), "shape"))
    nodes = [
        helper.make_node("Conv", ["input.1", "conv_w"], ["conv"], name="Conv_0", strides=[16, 16]),
        helper.make_node("PRelu", ["conv", "slope"], ["prelu"], name="PRelu_1"),
        helper.make_node(
            "BatchNormalization",
            ["prelu", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
            ["bn2"],
            name="BatchNormalization_2",
        ),
    ]
    if head == "Flatten":
        nodes.append(helper.make_node("Flatten", ["bn2"], ["flat"], name="Flatten_3", axis=1))
    else:
        nodes.append(helper.make_node("Reshape", ["bn2", "shape"], ["flat"], name="Reshape_3"))
    gemm_in = "flat"
    if between:
        nodes.append(helper.make_node(between, ["flat"], ["flat2"], name=f"{between}_4"))
        gemm_in = "flat2"
    nodes += [
        helper.make_node("Gemm", [gemm_in, "fc_w", "fc_b"], ["fc"], name="Gemm_5", transB=1),
        helper.make_node(
            "BatchNormalization",
            ["fc", "feat_scale", "feat_bias", "feat_mean", "feat_var"],
            ["683"],
            name="BatchNormalization_6",
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "toy_r50_tail",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", 512])],
        initializer=const,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("between", [None, "Identity", "Dropout"])
def test_the_w600k_r50_tail_is_found_by_following_the_gemm(tmp_path: Path, between: str | None) -> None:
    path = _tail_graph(tmp_path / "toy.onnx", between=between)
    encoder = FaceTokenEncoder(path, CPU)
    assert encoder.token_output == "bn2" and encoder.token_shape == (49, 8)
    crops = _crops(2)
    _, embeddings = encoder.encode(crops)
    reference = load_insightface_model(path, CPU).get_feat(crops)
    np.testing.assert_allclose(
        embeddings, reference / np.linalg.norm(reference, axis=1, keepdims=True), atol=1e-5
    )


def test_a_graph_without_a_flatten_gemm_tail_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="final Gemm is fed by a Reshape node, not by a Flatten"):
        FaceTokenEncoder(_tail_graph(tmp_path / "reshape.onnx", head="Reshape"), CPU)
    model = onnx.load(str(_tail_graph(tmp_path / "toy.onnx")))
    for node in model.graph.node:
        if node.op_type == "Gemm":
            node.op_type = "MatMul"
            del node.input[2:]
            del node.attribute[:]
    onnx.save(model, str(tmp_path / "matmul.onnx"))
    with pytest.raises(ModelError, match="no Gemm"):
        FaceTokenEncoder(tmp_path / "matmul.onnx", CPU)


# --- identities carry their tokens ------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_kit: Path) -> tuple[Any, Any]:
    folder = tiny_kit / "insightface"
    return load_insightface_model(folder / "tiny_det.onnx", CPU), load_insightface_model(
        folder / "tiny_arcface.onnx", CPU
    )


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    return [
        write_image(
            folder / f"{which}.png",
            np.ascontiguousarray(cv2.resize(getattr(skimage.data, which)(), (256, 256))[:, :, ::-1]),
        )
        for which in ("astronaut", "chelsea", "coffee")
    ]


def _enrol(library: IdentityLibrary, models: tuple[Any, Any], photos: list[Path], **extra: Any) -> Any:
    return library.enrol(
        "anna",
        photos,
        consent="model release #1",
        detector=models[0],
        recognizer=models[1],
        recognizer_sha256=RECOGNIZER_SHA,
        settings=RefineConfig(enrol=EnrolConfig(outlier=-1.0)),  # the tiny recognizer recognises nobody
        max_pixels=40_000_000,
        **extra,
    )


def test_enrolment_stores_face_tokens_and_they_load_back(
    tmp_path: Path, models: tuple[Any, Any], photos: list[Path], encoder: FaceTokenEncoder
) -> None:
    library = IdentityLibrary(tmp_path / "ids")
    saved = _enrol(library, models, photos).identity
    loaded = library.load("anna")
    assert saved.face_tokens is not None and saved.face_tokens.shape == (3, 49, 32)
    np.testing.assert_array_equal(loaded.face_tokens, saved.face_tokens)
    image = read_image(photos[1])
    crop = align_crops(image, detect_faces(image, models[0], DetectConfig()))[0]
    np.testing.assert_allclose(loaded.face_tokens[1], encoder.encode([crop])[0][0], atol=1e-5)
    tokens, embedding = identity_condition(loaded, photo=1)
    assert tokens.shape == (1, 49, 32) and np.array_equal(embedding[0], loaded.photo_embeddings[1])
    typical = int(np.argmax(loaded.photo_embeddings @ loaded.embedding))
    assert np.array_equal(identity_condition(loaded)[0][0], loaded.face_tokens[typical])
    revoked = library.revoke("anna")  # rewriting the file keeps the tokens
    np.testing.assert_array_equal(library.load("anna").face_tokens, revoked.face_tokens)


def test_a_token_encoder_of_another_model_is_refused(
    tmp_path: Path, models: tuple[Any, Any], photos: list[Path]
) -> None:
    write_recognizer(tmp_path / "other.onnx", seed=99)
    other = FaceTokenEncoder(tmp_path / "other.onnx", CPU)
    with pytest.raises(ModelError, match="is not the recognizer"):
        _enrol(IdentityLibrary(tmp_path / "ids"), models, photos, token_encoder=other)


def _identity_file(folder: Path, **tensors: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((2, 512)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    mean = rows.mean(axis=0)
    metadata = {
        "format": "portrait-studio-identity",
        "version": "1",
        "name": "anna",
        "consent": "release #7",
        "recognizer_sha256": RECOGNIZER_SHA,
        "source_sha256": json.dumps(["1" * 64, "2" * 64]),
        "created": "2026-01-05T10:00:00+00:00",
        "revoked": "",
    }
    folder.mkdir(parents=True, exist_ok=True)
    base = {"embedding": mean / np.linalg.norm(mean), "photo_embeddings": rows}
    save_file({**base, **tensors}, str(folder / "anna.safetensors"), metadata=metadata)
    return folder


def test_identity_files_without_tokens_load_and_bad_tokens_are_refused(tmp_path: Path) -> None:
    identity = IdentityLibrary(_identity_file(tmp_path / "old")).load("anna")
    assert identity.face_tokens is None
    with pytest.raises(IdentityError, match="no face tokens"):
        identity_condition(identity)
    bad = {
        "shape": (np.zeros((3, 49, 32), np.float32), r"shape \(3, 49, 32\), expected \(2, T, C\)"),
        "rank": (np.zeros((2, 49), np.float32), "expected"),
        "dtype": (np.zeros((2, 49, 32), np.float64), "dtype float64"),
        "nan": (np.full((2, 49, 32), np.nan, np.float32), "NaN"),
    }
    for name, (tokens, problem) in bad.items():
        library = IdentityLibrary(_identity_file(tmp_path / name, face_tokens=tokens))
        with pytest.raises(IdentityError, match=problem):
            library.load("anna")
