"""train_adapter.py on the tiny kit: ID shuffle, condition drop, overfitting, FAIR, checkpoints, resume.

The dataset is synthetic (3 people x 2 textured 128-px pictures, plus one uniform picture that has no
face); the tiny detector is a fixture that finds one face in any textured picture. Runs share one
preprocessing cache, so photos are encoded once per module.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import train_adapter as T
from studio.adapter.weights import load_adapter, read_training_config
from studio.errors import ConfigError
from studio.imageio import read_image, read_metadata, write_image

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train_tiny.toml"
PEOPLE, PHOTOS, SIDE = 3, 2, 128


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """people/person_<p>/photo_<k>.png: seeded noise + smooth shapes; person_0 also has a faceless picture."""
    root = tmp_path_factory.mktemp("people")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / SIDE  # [H, W] in 0..1
    for p in range(PEOPLE):
        for k in range(PHOTOS):
            cx, cy = rng.uniform(0.3, 0.7, 2)
            shape = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.02)[..., None]  # [H, W, 1]
            image = 90 + 40 * p + 80 * shape * rng.uniform(-1, 1, 3) + rng.normal(0, 10, (SIDE, SIDE, 3))
            write_image(root / f"person_{p}" / f"photo_{k}.png", np.clip(image, 0, 255).astype(np.uint8))
    write_image(root / "person_0" / "uniform.png", np.full((SIDE, SIDE, 3), 128, np.uint8))  # no face
    (root / "person_1" / "photo_1.txt").write_text("a portrait photo of a person, studio light\n")
    return root


@pytest.fixture(scope="module")
def workdir(tiny_kit: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"kit": tiny_kit, "dataset": dataset, "cache": tmp_path_factory.mktemp("cache")}


def _overrides(work: dict[str, Path], out: Path, **values: object) -> list[str]:
    """--set items: this module's kit, dataset and shared cache, a private out_dir, then ``values``."""
    paths = {"kit": str(work["kit"]), "dataset": str(work["dataset"]), "cache_dir": str(work["cache"])}
    items = {**paths, "out_dir": str(out), **values}
    return [f"{key}={json.dumps(value)}" for key, value in items.items()]  # JSON literals are TOML too


def _config(work: dict[str, Path], out: Path, **values: object) -> T.TrainConfig:
    return T.load_train_config(TINY_CONFIG, _overrides(work, out, **values))


# ------------------------------------------------------------------------------ (a) sampling


def test_id_shuffle_picks_another_photo_of_the_same_person() -> None:
    people = ["ann", "ann", "ben", "ben", "ben", "cy"]  # cy has one photo: the only case target == condition
    sampler = T.IdShuffleSampler(people, seed=3, cond_drop=0.0)
    draws = [sampler.draw(k) for k in range(600)]
    for target, condition, _ in draws:
        assert people[condition] == people[target]
        assert (condition == target) == (people[target] == "cy")
    assert sorted(t for t, _, _ in draws[:6]) == list(range(6))  # each epoch visits every photo once
    ben = {c for t, c, _ in draws if t == 2}
    assert ben == {3, 4}  # both other photos of ben get used


def test_sampler_stream_is_a_pure_function_of_seed_and_position() -> None:
    people = ["a", "a", "b", "b", "c", "c", "c"]
    whole = [T.IdShuffleSampler(people, seed=5, cond_drop=0.3).draw(k) for k in range(40)]
    resumed = T.IdShuffleSampler(people, seed=5, cond_drop=0.3, start=25)
    assert [d for d, _ in zip(resumed, range(15), strict=False)] == whole[25:]
    ranks = [T.IdShuffleSampler(people, seed=5, cond_drop=0.3, rank=r, world=2) for r in (0, 1)]
    shards = [[d for d, _ in zip(s, range(20), strict=False)] for s in ranks]
    assert [d for pair in zip(*shards, strict=True) for d in pair] == whole


def test_condition_drop_rate_matches_the_config() -> None:
    sampler = T.IdShuffleSampler(["a", "a", "b", "b"], seed=11, cond_drop=0.25)
    dropped = sum(sampler.draw(k)[2] for k in range(4000))
    assert abs(dropped - 1000) < 4 * (4000 * 0.25 * 0.75) ** 0.5  # within 4 sigma of the binomial mean


def test_dropped_condition_is_the_zero_face(tmp_path: Path) -> None:
    photos = []
    for k in range(2):
        data = {
            "latents": torch.full((4, 8, 8), float(k)),
            "mask": torch.ones(1, 8, 8),
            "text": torch.zeros(77, 32),
            "tokens": torch.full((49, 32), k + 1.0),
            "embedding": torch.full((512,), k + 1.0),
        }
        save_file(data, tmp_path / f"{k}.safetensors")
        photos.append(T.Photo("ann", tmp_path / f"{k}.png", tmp_path / f"{k}.safetensors"))
    dataset = T.FaceDataset(photos)
    kept, dropped = dataset[(0, 1, False)], dataset[(0, 1, True)]
    assert torch.equal(kept["latents"], torch.zeros(4, 8, 8))  # the target's picture ...
    assert torch.equal(kept["tokens"], torch.full((49, 32), 2.0))  # ... with the other photo's face
    assert torch.equal(kept["embedding"], torch.full((512,), 2.0))
    assert not dropped["tokens"].any() and not dropped["embedding"].any()
    assert torch.equal(dropped["latents"], kept["latents"])


# ------------------------------------------------------------------------------ (b), (c), (d) learning


@dataclass(frozen=True)
class OverfitRun:
    """A 30-step run, with the base model parts it trained against and their tensors as loaded."""

    result: T.TrainResult
    parts: dict[str, torch.nn.Module]  # "unet", "text_encoder", "vae" (the UNet now holds the fusers)
    loaded: dict[str, dict[str, torch.Tensor]]  # part -> parameter / buffer name -> copy at load time


@pytest.fixture(scope="module")
def overfit_run(workdir: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> OverfitRun:
    out = tmp_path_factory.mktemp("overfit")
    values = {"overfit_one_batch": True, "lr": 1e-2, "gate_init": 0.5, "cond_drop": 0.0, "lam": 0.0}
    parts: dict[str, torch.nn.Module] = {}
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    load_base = T._load_base

    def recording_load_base(*args: Any, **kwargs: Any) -> dict[str, Any]:
        found = load_base(*args, **kwargs)
        for name in ("unet", "text_encoder", "vae"):  # copied before the adapter is attached
            parts[name] = found[name]
            loaded[name] = {k: t.detach().clone() for k, t in _tensors(found[name]).items()}
        return found

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(T, "_load_base", recording_load_base)
        result = T.train(_config(workdir, out, max_steps=30, eval_every=0, save_every=1000, **values))
    return OverfitRun(result, parts, loaded)


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by name."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


@pytest.fixture(scope="module")
def overfit(overfit_run: OverfitRun) -> T.TrainResult:
    return overfit_run.result


def test_overfitting_one_batch_halves_the_loss(overfit: T.TrainResult) -> None:
    losses = [h["loss"] for h in overfit.history]
    assert len(losses) == 30
    assert min(losses[-5:]) <= 0.5 * losses[0], losses


def test_fair_penalty_shrinks_the_increment_outside_the_face(
    workdir: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = {}
    for lam in (0.0, 100.0):
        out = tmp_path_factory.mktemp(f"lam{lam}")
        values = {"overfit_one_batch": True, "lr": 1e-2, "gate_init": 0.5, "cond_drop": 0.0, "lam": lam}
        result = T.train(_config(workdir, out, max_steps=15, eval_every=0, save_every=1000, **values))
        outside[lam] = result.history[-1]["penalty"]  # same batch, noise and timesteps in both runs
    assert outside[100.0] < 0.5 * outside[0.0], outside


def test_saved_adapter_loads_back_identical(overfit: T.TrainResult, tiny_kit: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_kit / "tiny-sd15", subfolder="unet")
    spec = overfit.adapter.spec
    loaded = load_adapter(overfit.path, base_family="sd15", encoder_sha256=spec.encoder_sha256, unet=unet)
    trained = overfit.adapter.state_dict()
    assert loaded.spec == spec
    assert loaded.state_dict().keys() == trained.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, trained[key].cpu()), key
    meta = read_training_config(overfit.path)
    assert meta["step"] == 30 and meta["lam"] == 0.0 and meta["overfit_one_batch"] is True


def test_only_the_adapter_trains(overfit_run: OverfitRun) -> None:
    adapter = overfit_run.result.adapter
    gates = [float(f.alpha.detach()) for f in adapter.fusers]
    assert all(g != 0.5 for g in gates)  # the gates moved from gate_init
    assert all(p.requires_grad for p in adapter.parameters())
    assert len(overfit_run.result.history) == 30  # 30 optimizer steps ran against the parts below
    adapter_ids = {id(t) for t in adapter.parameters()}
    assert set(overfit_run.parts) == {"unet", "text_encoder", "vae"}
    for name, part in overfit_run.parts.items():
        now = {k: t for k, t in _tensors(part).items() if id(t) not in adapter_ids}
        before = overfit_run.loaded[name]
        assert now.keys() == before.keys(), name  # nothing of the base model added, dropped or replaced
        trainable = [k for k, t in part.named_parameters() if id(t) not in adapter_ids and t.requires_grad]
        assert not trainable, f"{name}: trainable base parameters {trainable[:5]}"
        changed = [k for k, t in now.items() if not torch.equal(t.detach().cpu(), before[k].cpu())]
        assert not changed, f"{name}: base tensors changed by training {changed[:5]}"
    in_unet = {id(t) for t in overfit_run.parts["unet"].parameters()} & adapter_ids
    assert in_unet, "the adapter's fusers should sit in the UNet"  # so the exclusion above is not vacuous


# ------------------------------------------------------------------------------ (e), (f), (g) runs


@pytest.fixture(scope="module")
def runs(workdir: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One 6-step run through main() (checkpoints at 3 and 6), and a second resumed from step 3."""
    values = {
        "max_steps": 6, "save_every": 3, "eval_every": 3, "grad_accum": 2, "cond_drop": 0.5,
        "lr": 3e-3, "lr_schedule": "cosine", "warmup_steps": 2, "gate_init": 0.2, "num_val_images": 2,
    }  # fmt: skip
    whole, resumed = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("resumed")
    argv = [str(TINY_CONFIG), *(x for item in _overrides(workdir, whole, **values) for x in ("--set", item))]
    assert T.main(argv) == 0
    config = _config(workdir, resumed, **values)
    result = T.train(config, resume=str(whole / "ckpt" / "step_3"))
    config = _config(workdir, whole, **values)
    return {"whole": whole, "resumed": resumed, "result": result, "config": config, "values": values}


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(runs: dict[str, object]) -> None:
    whole = load_file(runs["whole"] / "adapter.safetensors")  # type: ignore[operator]
    result: T.TrainResult = runs["result"]  # type: ignore[assignment]
    resumed = load_file(result.path)
    assert result.step == 6 and [h["step"] for h in result.history] == [4, 5, 6]
    assert whole.keys() == resumed.keys()
    worst = max(float((whole[k] - resumed[k]).abs().max()) for k in whole)
    assert worst <= 1e-6
    step6 = load_file(runs["whole"] / "ckpt" / "step_6" / "adapter.safetensors")  # type: ignore[operator]
    assert all(torch.equal(step6[k], whole[k]) for k in whole)


def test_checkpoint_carries_config_optimizer_schedule_and_rng(runs: dict[str, object]) -> None:
    folder: Path = runs["whole"] / "ckpt" / "step_3"  # type: ignore[operator]
    names = {p.name for p in folder.iterdir()}
    expected = {"adapter.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json"}
    assert expected | {"trainer.json", "config.toml", "rng_0.json", "rng_0.safetensors"} <= names
    assert not list(folder.parent.glob(".*"))  # no half-written checkpoint left behind
    config = T.config_to_dict(runs["config"])  # type: ignore[arg-type]
    assert tomllib.loads((folder / "config.toml").read_text()) == config
    assert read_training_config(folder / "adapter.safetensors") == {**config, "step": 3}
    trainer = json.loads((folder / "trainer.json").read_text())
    assert trainer["step"] == 3 and trainer["samples"] == 3 * 2 * 2 and trainer["world_size"] == 1
    optimizer = load_file(folder / "optimizer.safetensors")
    assert {k.split(".", 1)[1] for k in optimizer} == {"step", "exp_avg", "exp_avg_sq"}  # AdamW
    assert float(optimizer["0.step"]) == 3  # one optimizer step per grad_accum micro-batches
    assert json.loads((folder / "optimizer.json").read_text())["param_groups"][0]["lr"] > 0
    assert json.loads((folder / "scheduler.json").read_text())["last_epoch"] == 3
    rng = json.loads((folder / "rng_0.json").read_text())
    assert set(rng) == {"python", "numpy"} and len(rng["numpy"][1]) == 624
    assert {"torch_cpu", "noise"} <= set(load_file(folder / "rng_0.safetensors"))


def test_validation_pictures_are_written(runs: dict[str, object]) -> None:
    val: Path = runs["whole"] / "val"  # type: ignore[operator]
    assert sorted(p.name for p in val.iterdir()) == ["step_3.png", "step_6.png"]
    picture = read_image(val / "step_6.png")
    assert picture.shape == (64, 64 * 3, 3)  # the held-out reference face, then 2 pictures
    parameters = read_metadata(val / "step_6.png").parameters or ""
    assert "Adapter step: 6" in parameters and "Face: person_2" in parameters


def test_photos_without_one_face_are_skipped_and_cached_once(
    runs: dict[str, object], workdir: dict[str, Path]
) -> None:
    cached = list(workdir["cache"].rglob("*.safetensors"))
    assert len(cached) == PEOPLE * PHOTOS  # the uniform picture has no face: never cached
    captions = {load_file_metadata(p)["caption"] for p in cached}
    assert captions == {"a photo of a person", "a portrait photo of a person, studio light"}


def load_file_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as handle:
        return json.loads(handle.read(int.from_bytes(handle.read(8), "little")))["__metadata__"]


# ------------------------------------------------------------------------------ config and resume errors


def test_config_rejects_unknown_keys_and_bad_values(workdir: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        _config(workdir, tmp_path, learning_rate=1e-3)
    with pytest.raises(ConfigError, match="cond_drop"):
        _config(workdir, tmp_path, cond_drop=1.5)
    with pytest.raises(ConfigError, match="mixed_precision"):
        _config(workdir, tmp_path, mixed_precision="fp8")


def test_resume_refuses_a_changed_config_and_a_missing_checkpoint(
    runs: dict[str, object], workdir: dict[str, Path], tmp_path: Path
) -> None:
    checkpoint = str(runs["whole"] / "ckpt" / "step_3")  # type: ignore[operator]
    with pytest.raises(ConfigError, match="lam"):
        T.train(_config(workdir, tmp_path, **{**runs["values"], "lam": 0.5}), resume=checkpoint)  # type: ignore[dict-item]
    argv = [str(TINY_CONFIG), "--resume", *(x for i in _overrides(workdir, tmp_path) for x in ("--set", i))]
    assert T.main(argv) == 3  # InputError: no checkpoint under out_dir


def test_shipped_configs_load() -> None:
    tiny = T.load_train_config(TINY_CONFIG)
    assert (tiny.resolution, tiny.batch_size, tiny.mixed_precision) == (64, 2, "no")
    sd15 = T.load_train_config(TINY_CONFIG.with_name("train_sd15.toml"))
    assert (sd15.resolution, sd15.lr, sd15.batch_size, sd15.grad_accum) == (512, 1e-4, 8, 2)
    assert (sd15.mixed_precision, sd15.max_steps, sd15.lam, sd15.cond_drop) == ("bf16", 20000, 0.1, 0.1)
