"""Face-adapter training checkpoints: everything ``--resume`` needs to continue a run exactly.

``<out_dir>/ckpt/step_N/`` holds ``adapter.safetensors`` (with the config as metadata),
``optimizer.safetensors`` + ``optimizer.json`` (tensors / param groups and scalars: no pickle),
``scheduler.json``, ``trainer.json`` (format, step, sample position, world size, grad scaler),
``config.toml`` and per process ``rng_<rank>.json`` (python, numpy) + ``rng_<rank>.safetensors``
(torch CPU / CUDA, the noise generator). A checkpoint is built in a hidden temp folder and renamed
into place, so a crash never leaves a half-written one. The run's result is ``<out_dir>/adapter.safetensors``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import nn

from studio.adapter.fact import FaceAdapter
from studio.adapter.trainconfig import TrainConfig, config_to_dict
from studio.adapter.weights import read_adapter_spec, save_adapter
from studio.errors import ConfigError, InputError
from studio.files import write_bytes_atomic, write_text_atomic

logger = logging.getLogger(__name__)

CKPT_FORMAT = "portrait-studio-fact-train-checkpoint"
# keys a resumed run may change: where things go, how often it reports, and how long it runs
RESUME_MAY_CHANGE = frozenset(
    {"out_dir", "cache_dir", "kit", "max_steps", "eval_every", "save_every", "log_every"}
    | {"num_val_images", "val_steps", "val_cfg", "num_workers"}
)


@dataclass
class RunState:
    """The live state of a run: what checkpoints save and --resume restores."""

    config: TrainConfig
    accelerator: Any  # accelerate.Accelerator
    denoiser: nn.Module  # the prepared (possibly DDP-wrapped) UNet + adapter
    adapter: FaceAdapter
    optimizer: Any
    scheduler: Any
    noise_gen: torch.Generator
    step: int = 0
    samples: int = 0  # draws this process has consumed


# --- saving -----------------------------------------------------------------------------------------
def save_checkpoint(run: RunState) -> Path:
    """Write ckpt/step_N/ (built in a temp folder, renamed into place): everything --resume needs."""
    acc, root = run.accelerator, run.config.out_dir / "ckpt"
    final, tmp = root / f"step_{run.step}", root / f".step_{run.step}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    _save_rng(run, tmp, acc.process_index)
    if acc.is_main_process:
        _save_main_files(run, tmp)
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        logger.info("checkpoint: %s", final)
    acc.wait_for_everyone()
    return final


def _save_main_files(run: RunState, folder: Path) -> None:
    """The main process's files: adapter, optimizer, LR schedule, trainer state, config."""
    acc, config = run.accelerator, config_to_dict(run.config)
    save_adapter(run.adapter, folder / "adapter.safetensors", training_config={**config, "step": run.step})
    tensors, meta = _optimizer_to_files(run.optimizer.state_dict())
    write_bytes_atomic(folder / "optimizer.safetensors", save_tensors(tensors))
    write_text_atomic(folder / "optimizer.json", json.dumps(meta))
    write_text_atomic(folder / "scheduler.json", json.dumps(run.scheduler.state_dict()))
    scaler = acc.scaler.state_dict() if acc.scaler is not None else None
    trainer = {"format": CKPT_FORMAT, "version": 1, "step": run.step, "samples": run.samples}
    trainer |= {"world_size": acc.num_processes, "grad_scaler": scaler, "sampler_seed": run.config.seed}
    write_text_atomic(folder / "trainer.json", json.dumps(trainer, indent=1))
    write_text_atomic(folder / "config.toml", tomli_w.dumps(config))


def _save_rng(run: RunState, folder: Path, rank: int) -> None:
    """This process's RNG states: python + numpy as JSON; torch CPU / CUDA / noise generator, safetensors."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": [version, list(state), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"torch_cpu": torch.get_rng_state(), "noise": run.noise_gen.get_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    write_text_atomic(folder / f"rng_{rank}.json", json.dumps(states))
    write_bytes_atomic(folder / f"rng_{rank}.safetensors", save_tensors(tensors))


def _optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as flat tensors ``<param>.<name>`` plus JSON (param groups, scalars)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of _optimizer_to_files."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_final_adapter(run: RunState) -> Path:
    """Write out_dir/adapter.safetensors (the adapter with its config and step as metadata)."""
    config, final = run.config, run.config.out_dir / "adapter.safetensors"
    if run.accelerator.is_main_process:
        save_adapter(run.adapter, final, training_config={**config_to_dict(config), "step": run.step})
    run.accelerator.wait_for_everyone()
    logger.info(
        "final adapter: %s (step %d); use it: cp it to adapters/%s.safetensors", final, run.step, config.name
    )
    return final


# --- resuming ---------------------------------------------------------------------------------------
def find_checkpoint(out_dir: Path, resume: str) -> Path:
    """The checkpoint folder for --resume: a path, or "latest" = the highest step under out_dir/ckpt."""
    if resume != "latest":
        folder = Path(resume).expanduser()
    else:
        found = sorted((out_dir / "ckpt").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        folder = found[-1] if found else out_dir / "ckpt" / "step_<none>"
    if not (folder / "trainer.json").is_file():
        raise InputError(
            f"No training checkpoint at {folder}.",
            fix=f"pass --resume PATH to a ckpt/step_N folder under {out_dir}.",
        )
    return folder


def check_resume_config(config: TrainConfig, folder: Path) -> None:
    """Refuse to resume with settings that change the run (anything but places, reporting and length)."""
    saved = tomllib.loads((folder / "config.toml").read_text(encoding="utf-8"))
    now = config_to_dict(config)
    changed = sorted(k for k in now.keys() - RESUME_MAY_CHANGE if saved.get(k) != now[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(
            f"Cannot resume {folder}: the config differs in {diffs}.",
            fix=f"resume with the checkpoint's config ({folder / 'config.toml'}); only "
            f"{', '.join(sorted(RESUME_MAY_CHANGE))} may change.",
        )


def load_checkpoint(run: RunState, folder: Path) -> None:
    """Restore adapter, optimizer, LR schedule, grad scaler, step, sample position and RNG states."""
    acc = run.accelerator
    trainer = json.loads((folder / "trainer.json").read_text(encoding="utf-8"))
    if trainer.get("format") != CKPT_FORMAT or trainer.get("world_size") != acc.num_processes:
        raise InputError(
            f"Checkpoint {folder} was written by {trainer.get('world_size')} process(es) in format "
            f"{trainer.get('format')!r}; this run has {acc.num_processes}.",
            fix="resume with the same number of processes (accelerate launch --num_processes N).",
        )
    # 1. adapter weights: the file's spec must be this adapter's (float32 copy, no dtype round trip)
    path = folder / "adapter.safetensors"
    if read_adapter_spec(path) != run.adapter.spec:
        raise InputError(
            f"The adapter in {folder} does not match this config's adapter.", fix="check the config."
        )
    with torch.no_grad():
        run.adapter.load_state_dict(load_file(path), strict=True)
    # 2. optimizer, LR schedule, grad scaler, counters
    meta = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
    run.optimizer.load_state_dict(_optimizer_from_files(load_file(folder / "optimizer.safetensors"), meta))
    run.scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text(encoding="utf-8")))
    if acc.scaler is not None and trainer.get("grad_scaler"):
        acc.scaler.load_state_dict(trainer["grad_scaler"])
    run.step, run.samples = int(trainer["step"]), int(trainer["samples"])
    # 3. RNG states of this process
    _load_rng(run, folder, acc.process_index)
    logger.info("resumed from %s at step %d", folder, run.step)


def _load_rng(run: RunState, folder: Path, rank: int) -> None:
    """The inverse of _save_rng: python, numpy, torch CPU / CUDA and noise generator states."""
    states = json.loads((folder / f"rng_{rank}.json").read_text(encoding="utf-8"))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(folder / f"rng_{rank}.safetensors")
    torch.set_rng_state(tensors["torch_cpu"])
    run.noise_gen.set_state(tensors["noise"])
    if torch.cuda.is_available() and "cuda_0" in tensors:
        torch.cuda.set_rng_state_all([tensors[f"cuda_{i}"] for i in range(torch.cuda.device_count())])
