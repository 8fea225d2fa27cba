"""Refine wired into the studio: enrol → generate --identity, refine existing images, per-image status."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from studio.config import StudioConfig, load_config
from studio.errors import IdentityError, RefineError
from studio.files import sha256_file
from studio.imageio import read_image, read_metadata, write_image
from studio.pipeline import Studio
from studio.request import GenerateRequest

FAST = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture
def config(tiny_overrides: list[str], tmp_path: Path) -> StudioConfig:
    return load_config(
        "tiny", overrides=[*tiny_overrides, f"refine.identities_dir={str(tmp_path / 'ids')!r}"]
    )


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
    changed = np.argwhere(np.abs(out - src).max(axis=2) > 0)
    y0, x0 = changed.min(axis=0)
    y1, x1 = changed.max(axis=0)
    assert x0 > 0.2 * 512 and x1 < 0.8 * 512 and y0 > 0.1 * 512 and y1 < 0.85 * 512  # around the fixture face
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


def test_qa_minimum_marks_failures(config: StudioConfig, photos: list[Path]) -> None:
    strict = Studio(replace(config, refine=replace(config.refine, min_similarity=0.999)))
    strict.enrol("anna", photos, consent="release #123")
    result = strict.generate(GenerateRequest(prompt="x", identity="anna", **FAST))
    assert "FAILED QA" in result.statuses[0]
    assert read_metadata(result.outputs[0]).recipe["refine"]["status"] == "failed_qa"
