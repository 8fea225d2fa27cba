"""The identity library: enrolment gates, outliers, the safetensors format and its validation, consent."""

from __future__ import annotations

import json
import os
import re
import stat
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import skimage.data
from safetensors import safe_open
from safetensors.numpy import save_file

from studio import files
from studio.config import DetectConfig, EnrolConfig, RefineConfig
from studio.errors import IdentityError, InputError, OutputError
from studio.faces.detect import detect_faces, embed_faces
from studio.faces.identity import EnrolReport, IdentityLibrary, validate_name
from studio.files import sha256_file
from studio.imageio import read_image, write_image
from studio.models.runtime import load_insightface_model

CPU = ["CPUExecutionProvider"]
MAX_PIXELS = 40_000_000
RECOGNIZER_SHA = "ab" * 32
KEEP_ALL = RefineConfig(enrol=EnrolConfig(outlier=-1.0))  # the tiny recognizer recognises nobody


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_kit: Path) -> tuple[Any, Any]:
    folder = tiny_kit / "insightface"
    return load_insightface_model(folder / "tiny_det.onnx", CPU), load_insightface_model(
        folder / "tiny_arcface.onnx", CPU
    )


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """256x256 PNGs: three textured photos, a uniform one, a blurred one."""
    folder = tmp_path_factory.mktemp("photos")
    images = {which: _bgr(getattr(skimage.data, which)()) for which in ("astronaut", "chelsea", "coffee")}
    images["uniform"] = np.full((256, 256, 3), 128, np.uint8)
    images["blurred"] = cv2.GaussianBlur(images["astronaut"], (0, 0), 6)  # sharpness ~6 < 20
    return {name: write_image(folder / f"{name}.png", image) for name, image in images.items()}


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(cv2.resize(rgb, (256, 256))[:, :, ::-1])  # HxWx3 RGB -> BGR


def _enrol(
    library: IdentityLibrary,
    models: tuple[Any, Any],
    photos: list[Path],
    *,
    name: str = "anna",
    consent: Any = "model release #1",
    settings: RefineConfig = KEEP_ALL,
    detector: Any = None,
    recognizer: Any = None,
    replace: bool = False,
) -> EnrolReport:
    return library.enrol(
        name,
        photos,
        consent=consent,
        detector=detector or models[0],
        recognizer=recognizer or models[1],
        recognizer_sha256=RECOGNIZER_SHA,
        settings=settings,
        max_pixels=MAX_PIXELS,
        replace=replace,
    )


def _unit(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    rows = rng.standard_normal(shape).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def _write_file(folder: Path, name: str = "anna", **overrides: Any) -> Path:
    """An identity file written with safetensors directly: valid unless ``overrides`` break it."""
    rng = np.random.default_rng(0)
    photos = overrides.pop("photo_embeddings", _unit(rng, (2, 512)))
    embedding = overrides.pop("embedding", _unit(rng, (512,)))
    metadata = {
        "format": "portrait-studio-identity",
        "version": "1",
        "name": name,
        "consent": "release #7",
        "recognizer_sha256": RECOGNIZER_SHA,
        "source_sha256": json.dumps(["1" * 64, "2" * 64]),
        "created": "2026-01-05T10:00:00+00:00",
        "revoked": "",
        **overrides,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file({"embedding": embedding, "photo_embeddings": photos}, str(path), metadata=metadata)
    return path


class ScaledScores:
    """Wraps the real detector, scaling scores (a test double for the score gate)."""

    def __init__(self, detector: Any, factor: float) -> None:
        self.detector, self.factor = detector, factor

    def prepare(self, ctx_id: int, **kwargs: Any) -> None:
        self.detector.prepare(ctx_id, **kwargs)

    def detect(self, img: np.ndarray, input_size: Any = None, max_num: int = 0) -> tuple[Any, Any]:
        boxes, kps = self.detector.detect(img, input_size=input_size, max_num=max_num)
        return boxes * [1, 1, 1, 1, self.factor], kps


class WithSmallSecondFace:
    """Wraps the real detector, adding a second, smaller face (a test double for multi-face photos)."""

    def __init__(self, detector: Any) -> None:
        self.detector = detector

    def prepare(self, ctx_id: int, **kwargs: Any) -> None:
        self.detector.prepare(ctx_id, **kwargs)

    def detect(self, img: np.ndarray, input_size: Any = None, max_num: int = 0) -> tuple[Any, Any]:
        boxes, kps = self.detector.detect(img, input_size=input_size, max_num=max_num)
        small_box = np.array([[0, 0, 40, 50, 0.99]], np.float32)
        small_kps = kps[:1] * 0.3  # (1, 5, 2) x, y px, squeezed towards the corner
        return np.concatenate([small_box, boxes]), np.concatenate([small_kps, kps])


class FixedEmbeddings:
    """A recognizer double returning chosen embeddings, one row per crop in batch order."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def get_feat(self, imgs: list[np.ndarray]) -> np.ndarray:
        assert len(imgs) == len(self.rows)
        return self.rows * 3.0  # not normed: the studio normalises


# --- enrolment --------------------------------------------------------------------------------


def test_enrol_saves_a_file_that_loads_back_equal(tmp_path: Path, models: Any, photos: Any) -> None:
    library = IdentityLibrary(tmp_path / "ids")
    chosen = [photos["astronaut"], photos["chelsea"], photos["coffee"]]
    report = _enrol(library, models, chosen)
    assert report.used == tuple(chosen) and report.rejected == () and report.warnings == ()
    assert (tmp_path / "ids" / "anna.safetensors").is_file()
    loaded = library.load("anna")
    saved = report.identity
    np.testing.assert_allclose(loaded.embedding, saved.embedding, atol=1e-7)
    np.testing.assert_allclose(loaded.photo_embeddings, saved.photo_embeddings, atol=1e-7)
    assert loaded.consent == "model release #1" and loaded.recognizer_sha256 == RECOGNIZER_SHA
    assert loaded.source_sha256 == tuple(sha256_file(p) for p in chosen)
    assert loaded.created == saved.created and loaded.revoked is None
    assert datetime.fromisoformat(loaded.created).utcoffset().total_seconds() == 0
    # the rows are the photos' own embeddings, the identity their renormalised mean
    detector, recognizer = models
    image = read_image(chosen[1])
    expected = embed_faces(image, detect_faces(image, detector, DetectConfig()), recognizer)[0]
    np.testing.assert_allclose(loaded.photo_embeddings[1], expected, atol=1e-5)
    mean = loaded.photo_embeddings.mean(axis=0)
    np.testing.assert_allclose(loaded.embedding, mean / np.linalg.norm(mean), atol=1e-6)
    with safe_open(str(library.path_for("anna")), framework="numpy") as handle:
        assert handle.metadata()["format"] == "portrait-studio-identity"
        assert handle.metadata()["version"] == "2"
    assert loaded.scope == ("internal",) and loaded.expires is None  # a plain record: the default scope
    path = library.path_for("anna")
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700


def test_rejections_say_why(tmp_path: Path, models: Any, photos: Any) -> None:
    library = IdentityLibrary(tmp_path)
    chosen = [photos["uniform"], photos["astronaut"], photos["blurred"], photos["astronaut"]]
    report = _enrol(library, models, chosen, settings=RefineConfig())
    assert report.used == (photos["astronaut"],)
    reasons = dict(report.rejected)
    assert reasons[photos["uniform"]].startswith("no face found")
    assert reasons[photos["blurred"]].startswith("too blurry")
    assert len(report.rejected) == 3  # the second astronaut: "same file as"
    assert report.rejected[-1][1].startswith("same file as")


def test_small_faces_rejected_and_error_lists_every_reason(tmp_path: Path, models: Any, photos: Any) -> None:
    library = IdentityLibrary(tmp_path)
    settings = RefineConfig(enrol=EnrolConfig(min_face=200, outlier=-1.0))  # the fixture face: 115 px
    with pytest.raises(IdentityError) as caught:
        _enrol(library, models, [photos["astronaut"], photos["uniform"]], settings=settings)
    message = str(caught.value)
    assert "astronaut.png: face too small: 115 px < refine.enrol.min_face 200 px" in message
    assert "uniform.png: no face found" in message
    assert not (tmp_path / "anna.safetensors").exists()


def test_sharpness_gate_applies_to_sharp_photos_too(tmp_path: Path, models: Any, photos: Any) -> None:
    with pytest.raises(IdentityError, match="too blurry"):
        _enrol(
            IdentityLibrary(tmp_path),
            models,
            [photos["chelsea"]],
            settings=RefineConfig(enrol=EnrolConfig(min_sharpness=9000)),
        )


def test_low_score_rejected(tmp_path: Path, models: Any, photos: Any) -> None:
    detector = ScaledScores(models[0], 0.55)
    with pytest.raises(IdentityError, match=r"face score 0\.55 < refine\.enrol\.min_score 0\.6"):
        _enrol(IdentityLibrary(tmp_path), models, [photos["coffee"]], detector=detector)


def test_several_faces_use_the_largest_with_a_warning(tmp_path: Path, models: Any, photos: Any) -> None:
    report = _enrol(
        IdentityLibrary(tmp_path), models, [photos["coffee"]], detector=WithSmallSecondFace(models[0])
    )
    assert len(report.warnings) == 1 and "2 faces found; using the largest" in report.warnings[0]
    alone = _enrol(IdentityLibrary(tmp_path / "b"), models, [photos["coffee"]])
    np.testing.assert_allclose(report.identity.embedding, alone.identity.embedding, atol=1e-6)


def test_outlier_photo_dropped(tmp_path: Path, models: Any, photos: Any) -> None:
    rng = np.random.default_rng(3)
    person = _unit(rng, (512,))
    rows = _unit(rng, (4, 512)) * 0.5 + person  # three photos of one person ...
    rows[2] = _unit(rng, (512,))  # ... and somebody else
    chosen = [photos["astronaut"], photos["chelsea"], photos["coffee"], photos["blurred"]]
    settings = RefineConfig(enrol=EnrolConfig(min_sharpness=0.0))  # outlier 0.25, the default
    report = _enrol(
        IdentityLibrary(tmp_path), models, chosen, recognizer=FixedEmbeddings(rows), settings=settings
    )
    assert report.used == (chosen[0], chosen[1], chosen[3])
    assert report.rejected[0][0] == chosen[2] and report.rejected[0][1].startswith("outlier: cosine")
    kept = rows[[0, 1, 3]] / np.linalg.norm(rows[[0, 1, 3]], axis=1, keepdims=True)
    mean = kept.mean(axis=0)
    np.testing.assert_allclose(report.identity.embedding, mean / np.linalg.norm(mean), atol=1e-6)


def test_three_different_people_are_not_averaged(tmp_path: Path, models: Any, photos: Any) -> None:
    rows = np.eye(3, 512, dtype=np.float32)  # mutually orthogonal: nobody resembles anybody
    chosen = [photos["astronaut"], photos["chelsea"], photos["coffee"]]
    with pytest.raises(IdentityError, match="outlier"):
        _enrol(
            IdentityLibrary(tmp_path),
            models,
            chosen,
            recognizer=FixedEmbeddings(rows),
            settings=RefineConfig(),
        )
    two = _enrol(IdentityLibrary(tmp_path), models, chosen[:2], recognizer=FixedEmbeddings(rows[:2]))
    assert len(two.used) == 2  # with 2 photos there is no majority to judge by


def test_consent_and_existing_names(tmp_path: Path, models: Any, photos: Any) -> None:
    library = IdentityLibrary(tmp_path)
    for consent in ("", "   ", None):
        with pytest.raises(IdentityError, match="consent"):
            _enrol(library, models, [photos["astronaut"]], consent=consent)
    first = _enrol(library, models, [photos["astronaut"]])
    with pytest.raises(IdentityError, match="already exists"):
        _enrol(library, models, [photos["chelsea"]])
    second = _enrol(library, models, [photos["chelsea"]], replace=True)
    assert library.load("anna").source_sha256 == second.identity.source_sha256 != first.identity.source_sha256
    with pytest.raises(IdentityError, match="differs only in case"):
        _enrol(library, models, [photos["chelsea"]], name="Anna")


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "a\\b", "", ".hidden", "a..b", "x.safetensors", "é", "a" * 65]
)
def test_bad_names_refused_with_the_rule(tmp_path: Path, name: str) -> None:
    library = IdentityLibrary(tmp_path)
    for call in (validate_name, library.load, library.get, library.remove, library.revoke):
        with pytest.raises(IdentityError, match="letters, digits"):
            call(name)
    assert isinstance(IdentityError("x"), InputError)


def test_good_names_accepted() -> None:
    for name in ("anna", "Kenji_2", "a.b-c", "0", "x" * 64):
        assert validate_name(name) == name


WINDOWS_DEVICES = [
    "CON",
    "PRN",
    "AUX",
    "NUL",
    *(f"COM{d}" for d in range(1, 10)),
    *(f"LPT{d}" for d in range(1, 10)),
]


def _one_line_refusal(name: str, why: str, tmp_path: Path) -> None:
    """``name`` is refused by every library entry with one line: the name received, why, the fix."""
    library = IdentityLibrary(tmp_path)
    for call in (validate_name, library.path_for, library.get, library.remove, library.revoke):
        with pytest.raises(IdentityError) as caught:
            call(name)
        message = str(caught.value)
        assert "\n" not in message, message
        assert message.startswith(f"Identity name {name!r} is not allowed: "), message
        assert why in message and "Fix: use a name of" in message and "letters, digits" in message, message
    assert not any(tmp_path.iterdir())  # nothing was created for a refused name


@pytest.mark.parametrize(
    "name",
    [
        *WINDOWS_DEVICES,
        *(d.lower() for d in WINDOWS_DEVICES),
        *(d.capitalize() + ".txt" for d in WINDOWS_DEVICES),
        *(d.lower() + ".anna" for d in WINDOWS_DEVICES),
        "nUl.tar.gz",
        "Lpt9.x-y_z",
    ],
)
def test_windows_device_names_refused(tmp_path: Path, name: str) -> None:
    device = name.split(".")[0].upper()
    _one_line_refusal(name, f"{device} is a device name reserved on Windows", tmp_path)


@pytest.mark.parametrize("name", ["anna.", "anna ", "a.b.", "x" * 63 + ".", "con.", "anna\t ", " "])
def test_names_ending_in_a_dot_or_a_space_refused(tmp_path: Path, name: str) -> None:
    _one_line_refusal(name, "ends in a dot or a space", tmp_path)


@pytest.mark.parametrize(
    "name",
    ["CONSOLE", "con_1", "nully", "auxiliary", "prn-2", "COM10", "LPT10", "anna.con", "a.nul", "com1x"],
)
def test_names_that_only_resemble_devices_are_accepted(name: str) -> None:
    assert validate_name(name) == name


# --- loading and validation -------------------------------------------------------------------


def test_missing_identity_names_the_folder_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(IdentityError) as caught:
        IdentityLibrary(tmp_path).get("anna")
    assert str(tmp_path) in str(caught.value) and "studio identity add" in str(caught.value)


@pytest.mark.parametrize("suffix", [".pkl", ".npy", ".pt", ".pth", ".bin", ".json"])
def test_non_safetensors_files_refused(tmp_path: Path, suffix: str) -> None:
    (tmp_path / f"anna{suffix}").write_bytes(b"\x80\x04K\x01.")  # a pickle of 1: must never be opened
    with pytest.raises(IdentityError, match="identities are safetensors only; pickles are never loaded"):
        IdentityLibrary(tmp_path).load("anna")


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"embedding": np.full(512, np.nan, np.float32)}, "'embedding' holds NaN or infinite values"),
        (
            {"embedding": np.ones(511, np.float32) / np.sqrt(511)},
            r"'embedding' has shape \(511,\), expected \(512,\)",
        ),
        ({"embedding": np.ones(512) / np.sqrt(512)}, "'embedding' has dtype float64, expected float32"),
        ({"embedding": np.full(512, 2 / np.sqrt(512), np.float32)}, r"not L2-normed \(norm 2\.0000"),
        ({"photo_embeddings": np.ones((2, 511), np.float32)}, r"shape \(2, 511\), expected \(K, 512\)"),
        ({"source_sha256": "[1, 2]"}, "not a JSON list of strings"),
        ({"source_sha256": json.dumps(["1" * 64])}, "2 photo embeddings but 1 photo checksums"),
        ({"format": "something-else"}, "format/version"),
        ({"version": "3"}, "format/version"),
        ({"version": "2", "scope": "ads"}, "scope 'ads' is not a JSON list"),
        ({"consent": " "}, "consent record is empty"),
    ],
)
def test_invalid_files_name_the_problem(tmp_path: Path, overrides: dict[str, Any], problem: str) -> None:
    _write_file(tmp_path, **overrides)
    with pytest.raises(IdentityError, match=problem):
        IdentityLibrary(tmp_path).load("anna")


def test_renamed_file_refused(tmp_path: Path) -> None:
    _write_file(tmp_path, "bob").rename(tmp_path / "anna.safetensors")
    with pytest.raises(IdentityError, match="holds identity 'bob', not 'anna'"):
        IdentityLibrary(tmp_path).load("anna")


def test_garbage_file_refused(tmp_path: Path) -> None:
    (tmp_path / "anna.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(IdentityError, match="not a safetensors file"):
        IdentityLibrary(tmp_path).load("anna")


def test_a_valid_handwritten_file_loads(tmp_path: Path) -> None:
    _write_file(tmp_path)
    identity = IdentityLibrary(tmp_path).get("anna")
    assert identity.photo_embeddings.shape == (2, 512) and identity.consent == "release #7"


# --- revoke, list, remove ---------------------------------------------------------------------


def test_revoked_identity_is_listed_but_refused(tmp_path: Path) -> None:
    _write_file(tmp_path, "anna")
    _write_file(tmp_path, "bob")
    library = IdentityLibrary(tmp_path)
    revoked = library.revoke("anna")
    assert revoked.revoked is not None
    with pytest.raises(
        IdentityError, match=re.escape(f"revoked on {revoked.revoked}; its consent no longer")
    ):
        library.get("anna")
    assert [(i.name, i.revoked is not None) for i in library.list()] == [("anna", True), ("bob", False)]
    assert library.load("anna").revoked == revoked.revoked  # persisted
    assert library.revoke("anna").revoked == revoked.revoked  # revoking twice keeps the first time
    assert library.get("bob").name == "bob"


def test_list_skips_invalid_files(tmp_path: Path) -> None:
    _write_file(tmp_path, "anna")
    _write_file(tmp_path, "bob", embedding=np.full(512, np.nan, np.float32))
    assert [i.name for i in IdentityLibrary(tmp_path).list()] == ["anna"]
    assert IdentityLibrary(tmp_path / "missing").list() == []


def test_remove_deletes_the_file(tmp_path: Path) -> None:
    path = _write_file(tmp_path)
    library = IdentityLibrary(tmp_path)
    library.remove("anna")
    assert not path.exists()
    with pytest.raises(IdentityError, match="No identity 'anna'"):
        library.remove("anna")


def test_recognizer_mismatch_refused(tmp_path: Path) -> None:
    _write_file(tmp_path)
    library = IdentityLibrary(tmp_path)
    assert library.get("anna", recognizer_sha256=RECOGNIZER_SHA).name == "anna"
    with pytest.raises(IdentityError, match="recognizer"):
        library.get("anna", recognizer_sha256="cd" * 32)


def test_crash_during_save_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_file(tmp_path)
    before = path.read_bytes()

    def crash(fd: int) -> None:
        raise KeyboardInterrupt("power cut")  # after the bytes were written, before the rename

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    for failure, error in ((crash, KeyboardInterrupt), (disk_full, OutputError)):
        monkeypatch.setattr(files.os, "fsync", failure)
        with pytest.raises(error):
            IdentityLibrary(tmp_path).revoke("anna")
        assert path.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["anna.safetensors"]  # no temp file left


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_new_library_folder_is_private(tmp_path: Path, models: Any, photos: Any) -> None:
    _enrol(IdentityLibrary(tmp_path / "ids"), models, [photos["astronaut"]])
    assert stat.S_IMODE((tmp_path / "ids").stat().st_mode) == 0o700
