"""The draft stage on the tiny kit: model references, LoRAs, img2img, pose, samplers, reproduce, errors."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from studio.config import StudioConfig
from studio.draft.base import resolve_base
from studio.errors import InputError, ModelError, UnsafeFileError
from studio.imageio import read_image, read_metadata, write_image
from studio.pipeline import Studio
from studio.request import GenerateRequest
from studio.types import SAMPLERS

FAST = {"steps": 2, "width": 64, "height": 64}


def _pixels(studio: Studio, **kwargs: object) -> np.ndarray:
    result = studio.generate(GenerateRequest(prompt="a portrait", **{**FAST, **kwargs}))
    return read_image(result.outputs[0]).astype(int)


def test_lora_round_trips_in_both_layouts(studio: Studio) -> None:
    base = _pixels(studio)
    kohya = _pixels(studio, loras=(("tiny-style-kohya", 1.0),))
    diffusers_layout = _pixels(studio, loras=(("tiny-style-diffusers", 1.0),))
    both = _pixels(studio, loras=(("tiny-style-kohya", 0.5), ("tiny-style-diffusers", 0.5)))
    assert np.abs(kohya - base).max() > 0 and np.abs(diffusers_layout - base).max() > 0
    assert np.abs(kohya - diffusers_layout).max() > 0 and np.abs(both - kohya).max() > 0
    assert np.array_equal(_pixels(studio), base)  # a request without LoRAs is exactly the base model
    assert np.array_equal(_pixels(studio, loras=(("tiny-style-kohya", 1.0),)), kohya)  # switching back
    pipeline = next(v for k, v in studio.cache._items.items() if k[0] == "draft-pipeline")
    pipeline.unload_loras()
    assert np.array_equal(_pixels(studio), base)  # unloading leaves the base exactly as before


def test_pickle_lora_needs_permission_then_loads_weights_only(
    tiny_config: StudioConfig, tiny_kit: Path
) -> None:
    state = safetensors.torch.load_file(tiny_kit / "loras" / "tiny-style-diffusers.safetensors")
    folder = tiny_config.draft.lora_dir
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "legacy.pt")
    with pytest.raises(UnsafeFileError, match=r"pickle file \(\.pt\).*allow_pickle"):
        Studio(tiny_config).generate(GenerateRequest(prompt="x", loras=(("legacy.pt", 1.0),), **FAST))
    allowed = Studio(replace(tiny_config, models=replace(tiny_config.models, allow_pickle=True)))
    assert allowed.generate(GenerateRequest(prompt="x", loras=(("legacy.pt", 1.0),), **FAST)).outputs


def test_corrupt_and_missing_loras_are_clear(studio: Studio, tiny_config: StudioConfig) -> None:
    folder = tiny_config.draft.lora_dir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelError, match=r"broken\.safetensors is damaged: header claims"):
        studio.generate(GenerateRequest(prompt="x", loras=(("broken", 1.0),), **FAST))
    with pytest.raises(ModelError, match=r"The lora model 'nope' is not a catalogue name.*tiny-style-kohya"):
        studio.generate(GenerateRequest(prompt="x", loras=(("nope", 1.0),), **FAST))


def test_model_references_resolve(studio: Studio, tiny_config: StudioConfig, tiny_kit: Path) -> None:
    by_name = resolve_base("tiny-sd15", studio.catalogue, tiny_config)
    assert (by_name.family, by_name.source) == ("sd15", "single_file") and len(by_name.sha256) == 64
    folder = resolve_base(str(tiny_kit / "tiny-sdxl"), studio.catalogue, tiny_config)
    assert (folder.family, folder.source) == ("sdxl", "folder")
    single = resolve_base(str(tiny_kit / "tiny-sdxl.safetensors"), studio.catalogue, tiny_config)
    assert (single.family, single.source) == ("sdxl", "single_file")
    with pytest.raises(ModelError, match="base model 'no-such-model' is not a catalogue name"):
        resolve_base("no-such-model", studio.catalogue, tiny_config)
    with pytest.raises(ModelError, match=r"'nosuch/repo' is not a file or folder here.*cannot be loaded"):
        resolve_base("nosuch/repo", studio.catalogue, tiny_config)  # offline, not cached (HF_HUB_OFFLINE)


def test_sdxl_renders_through_the_same_pipeline(tiny_config: StudioConfig) -> None:
    sdxl = Studio(replace(tiny_config, draft=replace(tiny_config.draft, model="tiny-sdxl")))
    result = sdxl.generate(GenerateRequest(prompt="a (portrait:1.2) BREAK studio light", **FAST))
    assert read_image(result.outputs[0]).shape == (64, 64, 3)
    assert read_metadata(result.outputs[0]).recipe["draft"]["model"]["family"] == "sdxl"


def test_img2img_follows_strength(studio: Studio, tmp_path: Path) -> None:
    init = tmp_path / "master.png"
    gradient = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
    write_image(init, gradient)
    light = _pixels(studio, init_image=init, strength=0.3, steps=10)
    heavy = _pixels(studio, init_image=init, strength=1.0, steps=10)
    assert np.abs(light - gradient).mean() < np.abs(heavy - gradient).mean()
    with pytest.raises(InputError, match="strength"):
        _pixels(studio, init_image=init, strength=0.0)
    with pytest.raises(InputError, match="runs no denoising step"):
        _pixels(studio, init_image=init, strength=0.3, steps=2)


def test_pose_keypoints_steer_through_controlnet(studio: Studio, tmp_path: Path) -> None:
    pose = tmp_path / "pose.json"
    points = [
        [32, 10, 1],
        [32, 20, 1],
        [24, 20, 1],
        [20, 30, 1],
        [18, 40, 1],
        [40, 20, 1],
        [44, 30, 1],
        [46, 40, 1],
        [28, 40, 1],
        [28, 52, 1],
        [28, 62, 1],
        [36, 40, 1],
        [36, 52, 1],
        [36, 62, 1],
        [30, 8, 1],
        [34, 8, 1],
        [28, 9, 1],
        [36, 9, 1],
    ]
    pose.write_text(
        json.dumps(
            {
                "people": [{"pose_keypoints_2d": [v for p in points for v in p]}],
                "canvas_width": 64,
                "canvas_height": 64,
            }
        )
    )
    plain = _pixels(studio)
    posed = _pixels(studio, pose=pose)
    off = _pixels(studio, pose=pose, control_scale=0.0)
    assert np.abs(posed - plain).max() > 0
    assert np.abs(off - plain).max() <= 1
    with pytest.raises(InputError, match=r"ControlNet start 0\.9 / end 0\.1"):
        _pixels(studio, pose=pose, control_start=0.9, control_end=0.1)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_a1111_sampler_renders(studio: Studio, sampler: str) -> None:
    assert _pixels(studio, sampler=sampler).std() > 0


def test_reproduce_is_bit_identical(studio: Studio) -> None:
    first = studio.generate(
        GenerateRequest(
            prompt="a (keeper:1.3)",
            seed=11,
            count=3,
            batch_size=2,
            loras=(("tiny-style-kohya", 0.6),),
            style="editorial",
            **FAST,
        )
    )
    for path in (first.outputs[0], first.outputs[2]):  # one from a full batch, one from the short batch
        again = studio.reproduce(path)
        assert again.identical and again.differences == ()
        assert np.array_equal(read_image(again.result.outputs[0]), read_image(path))


def test_reproduce_refuses_changed_inputs(studio: Studio, tmp_path: Path) -> None:
    init = tmp_path / "in.png"
    write_image(init, np.full((64, 64, 3), 90, np.uint8))
    made = studio.generate(GenerateRequest(prompt="x", init_image=init, **FAST)).outputs[0]
    write_image(init, np.full((64, 64, 3), 91, np.uint8))
    with pytest.raises(InputError, match=r"in\.png is missing or changed since the image was made"):
        studio.reproduce(made)
    plain = tmp_path / "plain.png"
    shutil.copy(init, plain)
    with pytest.raises(InputError, match="carries no studio recipe"):
        studio.reproduce(plain)


@pytest.mark.parametrize(
    ("request_kwargs", "fragment"),
    [
        ({"style": "no-such-style"}, "Unknown style 'no-such-style'; known styles: 3d-render"),
        ({"prompt": "a {age}-year-old {job}"}, "age"),
        ({"width": 70}, "--width 70 is not allowed: use a multiple of 8 from 64 to 4096"),
    ],
)
def test_bad_inputs_are_clear(studio: Studio, request_kwargs: dict, fragment: str) -> None:
    kwargs = {"prompt": "x", **FAST, **request_kwargs}
    with pytest.raises(InputError) as info:
        studio.generate(GenerateRequest(**kwargs))
    assert fragment in str(info.value)
