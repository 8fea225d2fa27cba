"""Content checks: NudeNet on our own ORT session, faithfulness to nudenet, prompt terms, failing closed.

Faithfulness is shown on benign pictures only (scikit-image): our pre/post-processing against nudenet's own
``NudeDetector.detect``; the blocking path is exercised by blocking a class that fires on them (FACE_FEMALE).
"""

from __future__ import annotations

import ast
import dataclasses
import shutil
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

import cv2
import numpy as np
import pytest

from studio import safety
from studio.config import RuntimeConfig, SafetyConfig, StudioConfig, load_config
from studio.errors import ChecksumError, ConfigError, InputError, LicenceError, ModelError
from studio.models.cache import ModelCache
from studio.models.catalogue import Catalogue, load_catalogue
from studio.models.runtime import create_session
from studio.safety import (
    EXTRA_FIX,
    NUDENET_CLASSES,
    ContentVerdict,
    NudeNetCheck,
    UnavailableCheck,
    content_check,
    content_verdict,
    prompt_check,
)
from studio.types import ImageBGR

NO_NUDENET = "nudenet is not installed: these tests need the `safety` extra (uv sync --extra safety)"


@pytest.fixture(scope="module")
def nudenet() -> ModuleType:
    """nudenet's own module (its NudeDetector is the reference); skips when the extra is missing."""
    return pytest.importorskip("nudenet.nudenet", reason=NO_NUDENET)


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    """One model cache for the module: each session is built once."""
    return ModelCache()


@pytest.fixture(scope="module")
def pictures() -> dict[str, ImageBGR]:
    """Benign photos (HxWx3 uint8 BGR): a square one, a wide one, a tall crop."""
    data = pytest.importorskip("skimage.data", reason="scikit-image (test group) is not installed")
    astronaut = np.ascontiguousarray(data.astronaut()[:, :, ::-1])  # RGB -> BGR
    return {
        "astronaut": astronaut,
        "coffee": np.ascontiguousarray(data.coffee()[:, :, ::-1]),
        "astronaut_tall": np.ascontiguousarray(astronaut[:, 60:380]),
    }


def _config(tmp_path: Path, *, threads: int = 1, commercial: bool = False, **settings: Any) -> StudioConfig:
    """The default profile with NudeNet on the CPU and an empty models folder of its own."""
    base = load_config("default")
    models = dataclasses.replace(base.models, dir=tmp_path / "models", search_paths=())
    return dataclasses.replace(
        base,
        models=models,
        commercial=commercial,
        runtime=RuntimeConfig(onnx_providers="cpu", threads=threads),
        safety=SafetyConfig(checker="nudenet", **settings),
    )


def _catalogue(config: StudioConfig) -> Catalogue:
    return load_catalogue(config.models)


def _check(tmp_path: Path, cache: ModelCache, **settings: Any) -> NudeNetCheck:
    config = _config(tmp_path, **settings)
    check = content_check(config, _catalogue(config), cache)
    assert isinstance(check, NudeNetCheck)
    return check


def _swap_rb(image: ImageBGR) -> ImageBGR:
    return np.ascontiguousarray(image[:, :, ::-1])  # BGR <-> RGB


# --- the session and the model file -----------------------------------------------------------


def test_session_is_ours_on_the_requested_providers_and_cached(
    tmp_path: Path, nudenet: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Path, list[str], int]] = []

    def spy(model: Path, requested: list[str], threads: int = 0) -> Any:
        calls.append((Path(model), list(requested), threads))
        return create_session(model, requested, threads)

    monkeypatch.setattr(safety, "create_session", spy)
    fresh = ModelCache()
    config = _config(tmp_path, threads=1)
    check = content_check(config, _catalogue(config), fresh)
    again = content_check(config, _catalogue(config), fresh)
    assert isinstance(check, NudeNetCheck) and isinstance(again, NudeNetCheck)
    assert calls == [(Path(nudenet.__file__).with_name("320n.onnx"), ["CPUExecutionProvider"], 1)]
    assert check.session.get_providers() == ["CPUExecutionProvider"]
    assert again.session is check.session and sum(fresh.loads.values()) == 1
    # 0 threads (ORT's default) is another session
    other = content_check(_config(tmp_path, threads=0), _catalogue(config), fresh)
    assert isinstance(other, NudeNetCheck) and other.session is not check.session
    assert calls[-1][2] == 0 and sum(fresh.loads.values()) == 2


def test_a_pulled_copy_in_the_models_folder_is_preferred(tmp_path: Path, nudenet: ModuleType) -> None:
    config = _config(tmp_path)
    pulled = config.models.dir / safety.SAFETY_KIND / "320n.onnx"
    pulled.parent.mkdir(parents=True)
    shutil.copyfile(Path(nudenet.__file__).with_name("320n.onnx"), pulled)
    model = safety.locate_nudenet(config, _catalogue(config))
    assert model.path == pulled and model.licence == "AGPL-3.0" and not model.commercial


def test_catalogue_entry_is_the_wheel_file_with_its_real_licence(nudenet: ModuleType) -> None:
    entry = load_catalogue(load_config("default").models)["nudenet_320n"]
    wheel_file = Path(nudenet.__file__).with_name("320n.onnx")
    assert entry.size == wheel_file.stat().st_size
    assert entry.sha256 == safety.sha256_file(wheel_file)
    assert entry.licence == "AGPL-3.0" and entry.commercial is False
    assert entry.kind == safety.SAFETY_KIND and entry.io["size"] == 320


def test_class_list_is_nudenets_and_the_models_own(
    tmp_path: Path, nudenet: ModuleType, cache: ModelCache
) -> None:
    check = _check(tmp_path, cache)
    metadata = ast.literal_eval(check.session.get_modelmeta().custom_metadata_map["names"])
    assert list(NUDENET_CLASSES) == nudenet.__labels == [metadata[i] for i in range(len(metadata))]


def test_commercial_policy_refuses_the_agpl_model_even_when_required(tmp_path: Path) -> None:
    config = _config(tmp_path, commercial=True, required=True)
    with pytest.raises(LicenceError, match=r"nudenet_320n.*AGPL-3\.0"):
        content_check(config, _catalogue(config), ModelCache())


# --- faithfulness to nudenet 3.4.2 ------------------------------------------------------------


@pytest.mark.parametrize("name", ["astronaut", "coffee", "astronaut_tall"])
def test_input_blob_is_nudenets(name: str, nudenet: ModuleType, pictures: dict[str, ImageBGR]) -> None:
    image = pictures[name]
    reference = nudenet._read_image(image, 320)[0]  # 1x3x320x320, channels as nudenet feeds them (B, G, R)
    assert np.array_equal(safety._prepare_nudenet(image, 320, "BGR"), reference)
    # RGB (our default) is the same blob with R and B swapped
    assert np.array_equal(safety._prepare_nudenet(image, 320, "RGB"), reference[:, ::-1])


@pytest.mark.parametrize("channels", ["RGB", "BGR"])
@pytest.mark.parametrize("name", ["astronaut", "coffee", "astronaut_tall"])
def test_detections_match_nudenets_detector(
    name: str,
    channels: str,
    tmp_path: Path,
    nudenet: ModuleType,
    cache: ModelCache,
    pictures: dict[str, ImageBGR],
) -> None:
    check = _check(tmp_path, cache)
    if channels == "BGR":  # nudenet 3.4.2's own order, set through the catalogue entry's io
        entry = check.model.entry
        assert entry is not None
        io = MappingProxyType({**entry.io, "channels": "BGR"})
        model = dataclasses.replace(check.model, entry=dataclasses.replace(entry, io=io))
        check = NudeNetCheck(check.session, model, SafetyConfig(checker="nudenet"))
    image = pictures[name]
    # nudenet's network sees B, G, R of the file it reads: for RGB, give it the picture with R and B swapped
    path = tmp_path / f"{name}.png"
    cv2.imwrite(str(path), image if channels == "BGR" else _swap_rb(image))
    reference = sorted(nudenet.NudeDetector().detect(str(path)), key=lambda d: (d["class"], d["score"]))
    ours = sorted(check.detect(image), key=lambda d: (d.label, d.score))
    assert [d.label for d in ours] == [d["class"] for d in reference]
    for mine, theirs in zip(ours, reference, strict=True):
        x1, y1, x2, y2 = mine.box
        assert mine.score == pytest.approx(theirs["score"], abs=1e-5)
        assert np.allclose([x1, y1, x2 - x1, y2 - y1], theirs["box"], atol=1.0)  # nudenet truncates to int


def test_a_lower_threshold_only_adds_weaker_detections(
    tmp_path: Path, cache: ModelCache, pictures: dict[str, ImageBGR]
) -> None:
    default = _check(tmp_path, cache).detect(pictures["coffee"])
    low = _check(tmp_path, cache, threshold=0.05).detect(pictures["coffee"])
    assert set(default) <= set(low)
    assert all(d.score < 0.25 for d in set(low) - set(default))


# --- verdicts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_benign_pictures_pass(
    name: str, tmp_path: Path, cache: ModelCache, pictures: dict[str, ImageBGR]
) -> None:
    check = _check(tmp_path, cache)
    verdict = check.verdict(pictures[name])
    assert verdict.passed and verdict.reasons == () and check(pictures[name]) == ()
    assert verdict.checker == "nudenet:nudenet_320n"
    assert all(verdict.scores.get(label, 0.0) < 0.5 for label in SafetyConfig().blocked_classes)


def test_a_blocked_class_above_threshold_blocks_with_its_score(
    tmp_path: Path, cache: ModelCache, pictures: dict[str, ImageBGR]
) -> None:
    image = pictures["astronaut"]
    blocking = _check(tmp_path, cache, blocked_classes=("FACE_FEMALE",), threshold=0.5)
    verdict = blocking.verdict(image)
    score = verdict.scores["FACE_FEMALE"]
    assert not verdict.passed and score > 0.5
    assert verdict.reasons == (f"nudenet: FACE_FEMALE {score:.2f} >= 0.50",)
    assert blocking(image) == verdict.reasons and content_verdict(blocking, image) == verdict
    # the same class under a threshold above its score passes, and the score is still recorded
    lenient = _check(tmp_path, cache, blocked_classes=("FACE_FEMALE",), threshold=0.95).verdict(image)
    assert lenient.passed and lenient.scores["FACE_FEMALE"] == score


def test_unknown_blocked_class_is_a_config_error(tmp_path: Path) -> None:
    config = _config(tmp_path, blocked_classes=("FEMALE_BREAST_EXPOSD",), required=True)
    with pytest.raises(ConfigError, match=r"FEMALE_BREAST_EXPOSD.*Fix:.*FEMALE_BREAST_EXPOSED"):
        content_check(config, _catalogue(config), ModelCache())


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), "x.png"])
def test_images_that_are_not_hxwx3_uint8_are_refused(
    bad: Any, tmp_path: Path, cache: ModelCache, nudenet: ModuleType
) -> None:
    with pytest.raises(InputError, match="HxWx3 uint8 BGR"):
        _check(tmp_path, cache)(bad)


def test_checker_none_builds_nothing(tmp_path: Path) -> None:
    config = dataclasses.replace(_config(tmp_path), safety=SafetyConfig(checker="none", required=True))
    assert content_check(config, _catalogue(config), ModelCache()) is None


def test_content_verdict_of_a_plain_function() -> None:
    def reject_all(image: ImageBGR) -> tuple[str, ...]:
        return ("no",)

    verdict = content_verdict(reject_all, np.zeros((2, 2, 3), np.uint8))
    assert verdict == ContentVerdict(False, ("no",), MappingProxyType({}), "reject_all")


# --- a missing or failing checker ---------------------------------------------------------------


def _no_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safety, "_bundled_file", lambda filename: None)


def test_missing_model_required_fails_every_image_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pictures: dict[str, ImageBGR]
) -> None:
    _no_wheel(monkeypatch)
    config = _config(tmp_path, required=True)
    check = content_check(config, _catalogue(config), ModelCache())
    assert isinstance(check, UnavailableCheck)
    for image in (pictures["astronaut"], np.zeros((4, 4, 3), np.uint8)):
        reasons = check(image)
        assert len(reasons) == 1 and "safety.required = true" in reasons[0]
        assert "nudenet_320n" in reasons[0] and "uv sync --extra safety" in reasons[0]
        assert not content_verdict(check, image).passed


def test_missing_model_not_required_is_an_error_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_wheel(monkeypatch)
    config = _config(tmp_path, required=False)
    with pytest.raises(ModelError, match="nudenet_320n") as info:
        content_check(config, _catalogue(config), ModelCache())
    assert info.value.fix == EXTRA_FIX and "uv sync --extra safety" in str(info.value)


def test_absent_catalogue_entry_fails_closed_or_raises(tmp_path: Path) -> None:
    required = _config(tmp_path, model="no_such_model", required=True)
    check = content_check(required, _catalogue(required), ModelCache())
    assert isinstance(check, UnavailableCheck) and "no_such_model" in check.reason
    optional = _config(tmp_path, model="no_such_model")
    with pytest.raises(ModelError, match="no_such_model"):
        content_check(optional, _catalogue(optional), ModelCache())


def test_a_corrupt_wheel_file_fails_closed_or_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corrupt = tmp_path / "320n.onnx"
    corrupt.write_bytes(b"not an onnx model")
    monkeypatch.setattr(safety, "_bundled_file", lambda filename: corrupt)
    required = _config(tmp_path, required=True)
    check = content_check(required, _catalogue(required), ModelCache())
    assert isinstance(check, UnavailableCheck) and "does not match" in check.reason
    with pytest.raises(ChecksumError, match="does not match"):
        content_check(_config(tmp_path), _catalogue(required), ModelCache())


class _BrokenSession:
    """An ORT session stand-in whose inference fails (e.g. a GPU out of memory)."""

    def get_inputs(self) -> list[Any]:
        return [type("Input", (), {"name": "images"})()]

    def run(self, outputs: Any, feeds: Any) -> Any:
        raise RuntimeError("CUDA out of memory")


def test_a_failing_inference_fails_closed_when_required(tmp_path: Path) -> None:
    config = _config(tmp_path)
    entry = _catalogue(config)["nudenet_320n"]
    model = safety.ResolvedModel("nudenet_320n", "detector", "x.onnx", entry.sha256, "AGPL-3.0", False, entry)
    image = np.zeros((16, 16, 3), np.uint8)
    required = NudeNetCheck(_BrokenSession(), model, SafetyConfig(checker="nudenet", required=True))
    (reason,) = required(image)
    assert "check failed" in reason and "CUDA out of memory" in reason
    optional = NudeNetCheck(_BrokenSession(), model, SafetyConfig(checker="nudenet"))
    with pytest.raises(ModelError, match="CUDA out of memory"):
        optional(image)


# --- prompt terms -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a NUDE figure study", ("prompt: blocked term 'nude'",)),
        ("portrait, (Nude:1.3), studio light", ("prompt: blocked term 'nude'",)),
        ("denuded hillside, nudes are not this word", ()),
        ("nudeness", ()),
        ("Bare   Breasts at dawn", ("prompt: blocked term 'bare breasts'",)),
        ("bare_breasts, 1girl", ("prompt: blocked term 'bare breasts'",)),
        ("barely breasts", ()),
        (
            "nude, bare breasts, nude again",
            ("prompt: blocked term 'nude'", "prompt: blocked term 'bare breasts'"),
        ),
        ("a cat in a hat", ()),
    ],
)
def test_prompt_check_matches_whole_words_in_any_case(prompt: str, expected: tuple[str, ...]) -> None:
    assert prompt_check(prompt, ["nude", "bare breasts", "", "  "]) == expected


def test_prompt_check_escapes_terms_and_handles_unicode() -> None:
    assert prompt_check("c++ programmer", ["c++"]) == ("prompt: blocked term 'c++'",)
    assert prompt_check("ein NACKTES Modell", ["nacktes"]) == ("prompt: blocked term 'nacktes'",)
    assert prompt_check("anything", []) == ()
