"""The in-memory stage API: drafts and refines as objects, progress, concurrency on one model."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from studio.config import StudioConfig, load_config
from studio.draft import DraftRequest
from studio.imageio import write_image
from studio.pipeline import Studio
from studio.recipe import Recipe
from studio.request import GenerateRequest
from studio.results import Draft
from tests.conftest import private_overrides

FAST = {"steps": 3, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def studio(tiny_kit: Path, tmp_path_factory: pytest.TempPathFactory) -> Studio:
    work = tmp_path_factory.mktemp("core")
    config = load_config(
        "tiny",
        overrides=[
            f"models.tiny_kit={str(tiny_kit)!r}",
            f"models.dir={str(work / 'models')!r}",
            f"output_dir={str(work / 'out')!r}",
            *private_overrides(work),
        ],
    )
    return Studio(config)


def test_draft_returns_images_and_recipes_in_memory(studio: Studio) -> None:
    progress: list[tuple[int, int]] = []
    drafts = studio.draft(
        GenerateRequest("a {{curly}} {job}", variables={"job": "keeper"}, count=3, batch_size=2, **FAST),
        progress=lambda done, total: progress.append((done, total)),
    )
    assert [d.recipe.seed for d in drafts] == [42, 43, 44] and all(isinstance(d, Draft) for d in drafts)
    assert drafts[0].pil.size == (64, 64) and drafts[0].image.shape == (64, 64, 3)
    assert progress == [(k, 6) for k in range(1, 7)]  # 2 batches x 3 steps
    recipe = drafts[0].recipe
    assert recipe.request["prompt"] == "a {{curly}} {job}"  # the raw template is what is kept
    assert recipe.draft is not None and recipe.draft.prompt == "a {curly} keeper"
    assert recipe.draft.batch_seeds == (42, 43) and drafts[2].recipe.draft.batch_seeds == (44,)
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert not list(studio.config.output_dir.glob("*.png"))  # nothing written until save


def test_draft_keys_are_shared_by_what_decides_the_pixels(studio: Studio) -> None:
    one = studio.draft(GenerateRequest("a keeper", **FAST))[0].recipe
    same = studio.draft(GenerateRequest("a keeper", identity=None, **FAST))[0].recipe
    other = studio.draft(GenerateRequest("a keeper", seed=7, **FAST))[0].recipe
    assert one.draft_key == same.draft_key != other.draft_key
    assert one.id == same.id != other.id and len(one.id) == 64


def test_save_names_the_file_after_what_it_is(studio: Studio) -> None:
    draft = studio.draft(GenerateRequest("a keeper", seed=9, **FAST))[0]
    path = studio.save(draft)
    assert path.name.endswith("-9.png") and path.parent == studio.config.output_dir
    run_id = path.name[: -len("-9.png")]
    assert (path.parent / f"{run_id}-config.toml").is_file() and (
        path.parent / f"{run_id}-request.json"
    ).is_file()


def _render(studio: Studio, request: DraftRequest) -> list[np.ndarray]:
    from studio.draft import open_draft_pipeline

    pipeline = open_draft_pipeline(studio.config.draft.model, studio.catalogue, studio.config, studio.cache)
    return [image for _, image in pipeline.render(request)]


def test_two_threads_on_one_model_get_the_single_threaded_pixels(studio: Studio) -> None:
    from studio.models.resolve import resolve

    lora = resolve("tiny-style-kohya", "lora", studio.config, studio.catalogue)
    base = {"negative": "", "seed": 3, "count": 4, "width": 64, "height": 64, "steps": 3, "batch_size": 1}
    first = DraftRequest(prompt="a lighthouse", cfg=7.0, sampler="Euler a", **base)
    second = DraftRequest(prompt="a dwarf smith", cfg=4.0, sampler="DDIM", loras=((lora, 0.8),), **base)
    alone = [_render(studio, first), _render(studio, second)]
    together: list[list[np.ndarray]] = [[], []]
    threads = [
        threading.Thread(target=lambda k=k, r=r: together[k].extend(_render(studio, r)))
        for k, r in enumerate((first, second))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for k in (0, 1):
        assert len(together[k]) == 4
        assert all(np.array_equal(a, b) for a, b in zip(alone[k], together[k], strict=True))
    assert not np.array_equal(alone[0][0], alone[1][0])


def test_a_config_change_is_a_recipe_change(studio: Studio) -> None:
    config: StudioConfig = replace(studio.config, draft=replace(studio.config.draft, steps=5))
    again = Studio(config, studio.cache)
    a = studio.draft(GenerateRequest("a keeper", **FAST))[0].recipe
    b = again.draft(GenerateRequest("a keeper", **FAST))[0].recipe
    assert a.draft_key == b.draft_key  # the request's steps win: the same pixels
    assert a.id != b.id  # but the recipe was made under another config


def test_library_use_is_quiet(studio: Studio, capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fresh = Studio(studio.config)  # its own cache: the model loads again, LoRAs too
    fresh.draft(GenerateRequest("a keeper", loras=(("tiny-style-kohya", 0.5),), **FAST))
    fresh.draft(GenerateRequest("a keeper", loras=(("tiny-style-diffusers", 0.5),), **FAST))
    init = write_image(tmp_path / "init.png", np.full((64, 64, 3), 120, np.uint8))
    fresh.draft(GenerateRequest("a keeper", init_image=init, strength=0.7, **FAST))  # img2img variant
    pose = tmp_path / "pose.json"  # one person, BODY_18 keypoints in px: the ControlNet variant
    pose.write_text('{"people": [{"pose_keypoints_2d": [' + ", ".join(["32, 32, 1"] * 18) + "]}]}")
    fresh.draft(GenerateRequest("a keeper", pose=pose, pose_source="keypoints", **FAST))
    captured = capfd.readouterr()
    noise = captured.err + captured.out
    for fragment in ("Loading pipeline components", "it/s]", "LOAD REPORT", "peft_config", "float32"):
        assert fragment not in noise, noise


def test_differences_name_a_changed_draft_setting(studio: Studio) -> None:
    from studio.recipe import differences

    made = studio.draft(GenerateRequest("a keeper", **FAST))[0].recipe
    assert made.draft is not None
    edited = replace(made, draft=replace(made.draft, prompt="a keeper, oil painting", steps=9))
    found = differences(made, edited)
    assert any(d.startswith("draft prompt: 'a keeper' then") for d in found), found
    assert any(d.startswith("draft steps: 3 then, 9 now") for d in found), found
    assert differences(made, made) == []
