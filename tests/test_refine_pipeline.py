"""Refine wired into the studio: enrol → generate --identity, refine existing images, per-image status."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

import studio.faces.analysis as analysis
import studio.pipeline as pipeline
from studio.config import MaskConfig, StudioConfig, load_config
from studio.errors import IdentityError, RefineError, TemplateError
from studio.faces import load_face_models, refine_models
from studio.faces.detect import detect_faces
from studio.files import sha256_file
from studio.imageio import read_image, read_metadata, write_image
from studio.pipeline import Studio
from studio.qa import reroll_seed
from studio.recipe import Recipe
from studio.request import GenerateRequest
from studio.types import Face

FAST = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture
def config(tiny_overrides: list[str], tmp_path: Path) -> StudioConfig:
    private = [
        f"refine.identities_dir={str(tmp_path / 'ids')!r}",
        f"refine.templates_dir={str(tmp_path / 'tpl')!r}",
    ]
    return load_config("tiny", overrides=[*tiny_overrides, *private])


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    paths = []
    for name, picture in (("a.png", data.astronaut()), ("b.png", data.chelsea())):
        write_image(tmp_path / name, cv2.resize(picture[:, :, ::-1], (256, 256)))  # RGB -> BGR
        paths.append(tmp_path / name)
    return paths


@pytest.fixture
def studio(config: StudioConfig, photos: list[Path]) -> Studio:
    studio = Studio(config)
    report = studio.enrol("anna", photos, consent="release #123, 2026-11-01")
    assert report.used == tuple(photos)
    return studio


def test_generate_with_identity_refines_and_records_qa(studio: Studio) -> None:
    result = studio.generate(GenerateRequest(prompt="a portrait", identity="anna", count=2, **FAST))
    assert [s.split(": ", 1)[1].startswith("1 face found") for s in result.statuses] == [True, True]
    assert "similarity" in result.statuses[0]
    recipe = read_metadata(result.outputs[0]).recipe
    assert recipe["stages"] == ["draft", "refine"]
    assert recipe["refine"]["status"] == "ok" and recipe["refine"]["cast"] == "anna"
    assert recipe["refine"]["identities"]["anna"] == sha256_file(studio.identities.path_for("anna"))
    assert -1.0 <= recipe["refine"]["qa"][0]["similarity_after"] <= 1.0
    assert set(result.timings) >= {"load", "draft", "refine"}


def test_refine_existing_image_changes_only_the_face(studio: Studio, tmp_path: Path) -> None:
    master = tmp_path / "master.png"
    write_image(master, cv2.resize(data.coffee()[:, :, ::-1], (512, 512)))  # RGB -> BGR
    before = master.read_bytes()
    result = studio.refine_files([master], GenerateRequest(prompt="", identity="anna"))
    assert master.read_bytes() == before  # the source is never touched
    out, src = read_image(result.outputs[0]).astype(int), read_image(master).astype(int)
    changed = np.abs(out - src).max(axis=2) > 0  # HxW
    models = load_face_models(refine_models(studio.config, studio.catalogue), studio.config, studio.cache)
    (face,) = detect_faces(read_image(master), models.detector, studio.config.refine.detect)
    x0, y0, x1, y1 = (round(v) for v in face.box)
    pad = round(0.25 * face.size)  # the aligned crop reaches a little past the detector's box
    outside = np.ones_like(changed)
    outside[max(0, y0 - pad) : y1 + pad, max(0, x0 - pad) : x1 + pad] = False
    assert not changed[outside].any()  # nothing outside the face's region changed
    assert changed[y0:y1, x0:x1].mean() > 0.5  # most of the face did
    recipe = read_metadata(result.outputs[0]).recipe
    assert recipe["refine"]["upscaled"] == [True]  # a ~200 px face is larger than the 128 px swap crop
    assert recipe["source"] == {"path": str(master), "sha256": sha256_file(master)}


def test_a_refine_that_changes_nothing_writes_nothing(studio: Studio, tmp_path: Path) -> None:
    flat = tmp_path / "flat.png"
    write_image(flat, np.full((256, 256, 3), 128, np.uint8))
    textured = tmp_path / "one-face.png"
    write_image(textured, cv2.resize(data.astronaut()[:, :, ::-1], (256, 256)))  # RGB -> BGR
    none = studio.refine_files([flat], GenerateRequest(prompt="", identity="anna"))
    assert "no faces" in none.statuses[0] and none.outputs == ()
    assert none.unchanged == ("flat.png: no faces found: nothing swapped (no file written)",)
    few = studio.refine_files([textured], GenerateRequest(prompt="", identity="0=anna,1=anna"))
    assert "1 face found, mapping needs 2: nothing swapped" in few.statuses[0] and few.outputs == ()
    written = sorted(p.suffix for p in studio.config.output_dir.iterdir())
    assert written == [".json", ".json", ".toml", ".toml"]  # two runs' config + request, no image
    refined = studio.refine(studio.open(textured), "0=anna,1=anna")
    assert not refined.changed and refined.status == "too_few_faces"
    with pytest.raises(RefineError, match="Nothing to save: 1 face found, mapping needs 2"):
        studio.save(refined)


def test_revoked_and_unknown_identities_are_refused(studio: Studio) -> None:
    studio.identities.revoke("anna")
    with pytest.raises(IdentityError, match="revoked"):
        studio.generate(GenerateRequest(prompt="x", identity="anna", **FAST))
    with pytest.raises(IdentityError, match="studio identity add"):
        studio.generate(GenerateRequest(prompt="x", identity="kenji", **FAST))


def test_reproduce_repeats_the_refine(studio: Studio) -> None:
    made = studio.generate(GenerateRequest(prompt="x", identity="anna", seed=3, **FAST)).outputs[0]
    again = studio.reproduce(made)
    assert again.identical and read_metadata(again.result.outputs[0]).recipe["stages"] == ["draft", "refine"]


def test_reproduce_runs_under_the_recipes_config(config: StudioConfig, photos: list[Path]) -> None:
    soft = Studio(replace(config, refine=replace(config.refine, mask=MaskConfig(blur=0.4))))
    soft.enrol("anna", photos, consent="release #123")
    made = soft.generate(GenerateRequest(prompt="x", identity="anna", seed=4, **FAST)).outputs[0]
    plain = Studio(config)  # mask blur 0.1: the profile's default
    again = plain.reproduce(made)
    assert again.identical and again.differences == ()
    current = plain.reproduce(made, use_current_config=True)
    assert not current.identical and "config [refine] differs" in current.differences


def test_a_refaced_master_keeps_its_recipe_and_reproduces(studio: Studio) -> None:
    master = studio.generate(GenerateRequest(prompt="a master creative", seed=21, **FAST)).outputs[0]
    refaced = studio.refine_files([master], GenerateRequest(prompt="", identity="anna")).outputs[0]
    recipe = Recipe.from_dict(read_metadata(refaced).recipe)  # type: ignore[arg-type]
    assert recipe.stages == ("refine",) and recipe.parent is not None and recipe.parent.seed == 21
    assert recipe.source == {"path": str(master), "sha256": sha256_file(master)}
    assert "a master creative" in (read_metadata(refaced).parameters or "")  # A1111 text from the parent
    assert studio.reproduce(refaced).identical


def test_reenrolled_identity_is_named_when_pixels_differ(studio: Studio, photos: list[Path]) -> None:
    made = studio.generate(GenerateRequest(prompt="x", identity="anna", seed=8, **FAST)).outputs[0]
    studio.enrol("anna", photos[:1], consent="release #124", replace=True)  # other photos: other embedding
    again = studio.reproduce(made)
    assert not again.identical
    assert any(d.startswith("identity 'anna': file sha256") for d in again.differences), again.differences


def test_qa_failure_is_written_apart_and_marked(config: StudioConfig, photos: list[Path]) -> None:
    strict = Studio(replace(config, refine=replace(config.refine, min_similarity=0.999)))
    strict.enrol("anna", photos, consent="release #123")
    result = strict.generate(GenerateRequest(prompt="x", identity="anna", **FAST))
    assert "FAILED QA" in result.statuses[0]
    assert result.outputs == () and len(result.failed_qa) == 1
    failed = result.failed_qa[0]
    assert failed.parent.name == "failed-qa" and failed.name.endswith("-42-anna-FAILED-QA.png")
    assert read_metadata(failed).recipe["refine"]["status"] == "failed_qa"
    assert not list(failed.parent.parent.glob(f"{result.run_id}-*.png"))  # nothing beside the good ones


def test_rerolls_use_derived_seeds_and_stop_at_the_budget(config: StudioConfig, photos: list[Path]) -> None:
    strict = Studio(replace(config, refine=replace(config.refine, min_similarity=0.999)))
    strict.enrol("anna", photos, consent="release #123")
    result = strict.generate(GenerateRequest(prompt="x", identity="anna", **FAST), max_rerolls=2)
    rerolls = [s for s in result.statuses if "re-roll" in s]
    first = strict.planned_recipe(GenerateRequest(prompt="x", identity="anna", **FAST))
    seeds = [reroll_seed(first.id, n) for n in (1, 2)]  # keyed by the first try's recipe id
    assert len(rerolls) == 2
    expected = [f"re-roll {n} with seed {seed}" for n, seed in zip((1, 2), seeds, strict=True)]
    assert all(text in line for text, line in zip(expected, rerolls, strict=True))
    (failed,) = result.failed_qa
    assert read_metadata(failed).recipe["draft"]["seed"] == seeds[1]  # the last try is the one kept


def test_a_passing_reroll_is_written_normally(config: StudioConfig, photos: list[Path]) -> None:
    calls: list[int] = []

    def picky(image: np.ndarray) -> tuple[str, ...]:  # fails the first image it sees, passes the rest
        calls.append(1)
        return ("too dark",) if len(calls) == 1 else ()

    studio = Studio(config, content_check=picky)
    result = studio.generate(GenerateRequest(prompt="x", **FAST), max_rerolls=3)
    assert len(calls) == 2 and result.failed_qa == () and len(result.outputs) == 1
    assert "content: too dark" in result.statuses[0]
    assert read_metadata(result.outputs[0]).recipe["draft"]["seed"] != 42


# --- multi-person templates (the tiny detector finds one fixed face: detection is replaced below) --------


def _two_faces(image: np.ndarray) -> tuple[Face, ...]:
    """The tiny fixture face in each half of a 2:1 picture, scaled to ``image``, left to right."""
    side = image.shape[1] / 2  # each half is a square of this side
    points = [(0.42, 0.40), (0.58, 0.40), (0.50, 0.50), (0.435, 0.60), (0.565, 0.60)]  # x, y per side
    faces = []
    for left in (0.0, side):
        landmarks = np.array([[left + side * px, side * py] for px, py in points], np.float32)  # (5, 2) px
        box = (left + 0.3 * side, 0.22 * side, left + 0.7 * side, 0.72 * side)
        faces.append(Face(box=box, landmarks=landmarks, score=0.99))
    return tuple(faces)


@pytest.fixture
def duo(studio: Studio, photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Template 'duo' (a 512x256 master, two faces) and identity kenji; refine's detector lists the two
    faces in a different order on every call, as a real one may across a batch."""
    studio.enrol("kenji", photos[:1], consent="release #124")
    half = cv2.resize(data.astronaut()[:, :, ::-1], (256, 256))  # RGB -> BGR
    master = tmp_path / "duo.png"
    write_image(master, np.concatenate([half, half], axis=1))  # 256x512x3: the same face twice
    calls = iter(range(1000))

    def shuffled(image: np.ndarray, detector: object, settings: object) -> tuple[Face, ...]:
        return _two_faces(image)[:: 1 if next(calls) % 2 else -1]  # reversed on the 1st, 3rd, ... call

    monkeypatch.setattr(pipeline, "detect_faces", lambda image, detector, settings: _two_faces(image))
    monkeypatch.setattr(analysis, "detect_faces", shuffled)
    assert len(studio.add_template("duo", master).slots) == 2
    return master


def test_refine_on_a_template_maps_slots_and_records_the_template(studio: Studio, duo: Path) -> None:
    result = studio.refine_files([], GenerateRequest(prompt="", identity="0=anna,1=kenji", template="duo"))
    assert (
        "2 faces found, template 'duo': slot 0 = face 1 -> anna, slot 1 = face 0 -> kenji"
        in result.statuses[0]
    )
    recipe = read_metadata(result.outputs[0]).recipe
    template = studio.templates.path_for("duo")
    assert recipe["refine"]["template"] == {"name": "duo", "sha256": sha256_file(template),
                                            "image_sha256": sha256_file(duo)}  # fmt: skip
    assert recipe["request"]["template"] == "duo" and recipe["refine"]["cast"] == "0=anna,1=kenji"
    assert recipe["source"]["path"] == str(studio.templates.image_path(studio.templates.load("duo")))
    changed = np.abs(read_image(result.outputs[0]).astype(int) - read_image(duo).astype(int)).max(axis=2) > 0
    assert changed[:, :256].any() and changed[:, 256:].any()  # both people re-faced
    assert studio.reproduce(result.outputs[0]).identical


def test_generate_on_a_template_drafts_from_the_master_and_keeps_slots(studio: Studio, duo: Path) -> None:
    request = GenerateRequest(prompt="x", identity="0=anna,1=kenji", template="duo", count=2,
                              **{**FAST, "width": 128})  # fmt: skip
    result = studio.generate(request)
    first, second = (s.split(", template 'duo': ")[1] for s in result.statuses)
    assert first.startswith("slot 0 = face 1 -> anna, slot 1 = face 0 -> kenji")  # detected right to left...
    assert second.startswith("slot 0 = face 0 -> anna, slot 1 = face 1 -> kenji")  # ...then left to right
    recipe = read_metadata(result.outputs[0]).recipe
    assert recipe["draft"]["inputs"]["init_image"]["sha256"] == sha256_file(duo)  # img2img from the master
    assert recipe["refine"]["template"]["name"] == "duo"


def test_a_cast_that_does_not_fit_the_template_fails_before_any_model_loads(
    studio: Studio, duo: Path
) -> None:
    fresh = Studio(studio.config)
    loaded = dict(fresh.cache.loads)
    wrong = GenerateRequest(prompt="x", identity="0=anna,1=kenji,2=anna", template="duo", **FAST)
    for run in (fresh.planned_recipe, fresh.generate, lambda r: fresh.refine_files([], r)):
        with pytest.raises(TemplateError, match="Template 'duo' has 2 slots but the cast maps 3: 0=anna"):
            run(wrong)
    with pytest.raises(TemplateError, match="did you mean 'duo'"):
        fresh.planned_recipe(replace(wrong, template="dou"))
    with pytest.raises(TemplateError, match="needs a cast for its slots"):
        fresh.planned_recipe(replace(wrong, identity=None))
    assert dict(fresh.cache.loads) == loaded  # no model was loaded
