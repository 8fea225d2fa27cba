"""Identity-conditioned drafts through the studio: FACT and IP-Adapter-FaceID on the tiny kit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from studio.config import StudioConfig
from studio.errors import AdapterError, InputError
from studio.imageio import read_image, read_metadata, write_image
from studio.pipeline import Studio
from studio.request import GenerateRequest

FAST = {"steps": 2, "width": 64, "height": 64, "seed": 9}


@pytest.fixture(scope="module")
def studio(tiny_config: StudioConfig, tmp_path_factory: pytest.TempPathFactory) -> Studio:
    folder = tmp_path_factory.mktemp("ids")
    config = replace(tiny_config, refine=replace(tiny_config.refine, identities_dir=folder, enabled=False))
    studio = Studio(config)
    photo = folder / "anna.png"
    write_image(photo, cv2.resize(data.astronaut()[:, :, ::-1], (256, 256)))  # RGB -> BGR
    studio.enrol("anna", [photo], consent="release #123")
    return studio


def _pixels(studio: Studio, **kwargs: object) -> np.ndarray:
    result = studio.generate(GenerateRequest(prompt="a portrait", **{**FAST, **kwargs}))
    return read_image(result.outputs[0]).astype(int)


@pytest.mark.parametrize("kind", ["fact", "ipadapter-faceid"])
def test_adapter_steers_and_scale_zero_is_the_base(studio: Studio, kind: str) -> None:
    base = _pixels(studio)
    steered = _pixels(studio, identity="anna", adapter=kind, adapter_scale=1.0)
    assert np.abs(steered - base).mean() > 0.05
    off = _pixels(studio, identity="anna", adapter=kind, adapter_scale=0.0)
    if kind == "fact":
        assert np.array_equal(off, base)  # scale 0: the fusers return their input exactly
    assert np.array_equal(_pixels(studio), base)  # a later request without adapter is the base model


def test_adapter_works_with_lora_and_pose(studio: Studio, tmp_path: Path) -> None:
    pose = tmp_path / "pose.png"
    skeleton = np.zeros((64, 64, 3), np.uint8)
    cv2.line(skeleton, (32, 8), (32, 50), (0, 0, 255), 3)  # a stick figure on black
    cv2.line(skeleton, (16, 24), (48, 24), (0, 255, 0), 3)
    write_image(pose, skeleton)
    plain = _pixels(studio, identity="anna", adapter="fact", adapter_scale=1.0)
    styled = _pixels(
        studio,
        identity="anna",
        adapter="fact",
        adapter_scale=1.0,
        loras=(("tiny-style-kohya", 0.8),),
        pose=pose,
        pose_source="image",
    )
    assert np.abs(styled - plain).mean() > 0.05


def test_adapter_is_recorded_and_reproduced(studio: Studio) -> None:
    made = studio.generate(
        GenerateRequest(prompt="x", identity="anna", adapter="fact", adapter_scale=0.7, **FAST)
    )
    recipe = read_metadata(made.outputs[0]).recipe
    adapter = recipe["draft"]["adapter"]
    assert adapter["kind"] == "fact" and adapter["scale"] == 0.7 and len(adapter["identity_sha256"]) == 64
    assert "Face adapter: fact anna scale 0.7" in read_metadata(made.outputs[0]).parameters
    assert studio.reproduce(made.outputs[0]).identical


def test_adapter_requests_are_checked(studio: Studio, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="needs an identity"):
        studio.generate(GenerateRequest(prompt="x", adapter="fact", **FAST))
    with pytest.raises(InputError, match="one identity"):
        studio.generate(GenerateRequest(prompt="x", identity="0=anna,1=anna", adapter="fact", **FAST))
    sdxl = Studio(replace(studio.config, draft=replace(studio.config.draft, model="tiny-sdxl")))
    with pytest.raises(AdapterError, match="sd15"):
        sdxl.generate(GenerateRequest(prompt="x", identity="anna", adapter="fact", **FAST))


def test_faceid_stays_loaded_across_alternating_requests(
    studio: Studio, monkeypatch: pytest.MonkeyPatch
) -> None:
    import studio.draft.face as face

    faceid = {"identity": "anna", "adapter": "ipadapter-faceid", "adapter_scale": 1.0}
    first, base = _pixels(studio, **faceid), _pixels(studio)
    fact = _pixels(studio, identity="anna", adapter="fact", adapter_scale=1.0)
    loads: list[object] = []
    monkeypatch.setattr(face, "load_faceid", lambda *a, **k: loads.append(a))  # a reload would be caught
    for _ in range(2):  # FaceID, base, FACT, FaceID ...: the same pixels each time, and no reload
        assert np.array_equal(_pixels(studio, **faceid), first)
        assert np.array_equal(_pixels(studio), base)
        assert np.array_equal(_pixels(studio, identity="anna", adapter="fact", adapter_scale=1.0), fact)
    assert not np.array_equal(_pixels(studio, **{**faceid, "adapter_scale": 0.5}), first)  # scale applies
    assert loads == []
