"""The whole A1111 name → diffusers scheduler mapping, pinned, from both base models' scheduler configs."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)

from studio.draft.schedulers import make_scheduler
from studio.types import SAMPLERS, Sampler

BASE = Path(__file__).resolve().parents[2] / "configs" / "base"
KARRAS = {"use_karras_sigmas": True, "use_exponential_sigmas": False, "use_beta_sigmas": False}
UNIFORM = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
DPMPP_2M = {"solver_order": 2, "solver_type": "midpoint", "lower_order_final": True}

# name → (class, the config values that make it that sampler); A1111's sd_samplers_kdiffusion.py,
# sd_samplers_timesteps.py and shared_options.py (UniPC: bh1, order 3, lower_order_final, time_uniform)
EXPECTED: dict[Sampler, tuple[type, dict[str, Any]]] = {
    "Euler a": (EulerAncestralDiscreteScheduler, {"timestep_spacing": "linspace"}),
    "Euler": (EulerDiscreteScheduler, {"timestep_spacing": "linspace", **UNIFORM}),
    "DPM++ 2M": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "timestep_spacing": "linspace", **UNIFORM, **DPMPP_2M},
    ),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", **KARRAS, **DPMPP_2M}),
    "DPM++ 2M SDE Karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", **KARRAS, **DPMPP_2M},
    ),
    "DDIM": (
        DDIMScheduler,
        {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False},
    ),
    "UniPC": (
        UniPCMultistepScheduler,
        {
            "solver_type": "bh1",
            "solver_order": 3,
            "lower_order_final": True,
            "predict_x0": True,
            "timestep_spacing": "linspace",
            "final_sigmas_type": "sigma_min",
            **UNIFORM,
        },
    ),
    "LCM": (LCMScheduler, {}),
}
# what every scheduler keeps from the model: its noise schedule
MODEL_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")


def _base_config(family: str) -> dict[str, Any]:
    return json.loads((BASE / family / "scheduler" / "scheduler_config.json").read_text())


def test_the_mapping_covers_exactly_the_sampler_names() -> None:
    assert set(EXPECTED) == set(SAMPLERS)
    assert "DPM++ SDE Karras" not in SAMPLERS  # needs torchsde (DPMSolverSDEScheduler): not offered


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_builds_its_scheduler(family: str, sampler: Sampler) -> None:
    base = _base_config(family)
    scheduler = make_scheduler(sampler, base)
    cls, values = EXPECTED[sampler]
    assert type(scheduler) is cls
    assert {k: scheduler.config[k] for k in values} == values
    assert {k: scheduler.config[k] for k in MODEL_KEYS} == {
        k: base.get(k, "epsilon" if k == "prediction_type" else None) for k in MODEL_KEYS
    }


def test_a_model_config_cannot_turn_one_sampler_into_another() -> None:
    odd = {**_base_config("sd15"), "use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}
    odd |= {"solver_order": 1, "timestep_spacing": "trailing", "clip_sample": True}
    for sampler in SAMPLERS:
        _, values = EXPECTED[sampler]
        assert {k: make_scheduler(sampler, odd).config[k] for k in values} == values, sampler


def test_karras_sigmas_span_the_model_range_with_rho_7() -> None:
    scheduler = make_scheduler("DPM++ 2M Karras", _base_config("sd15"))
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas.double()
    full = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt().double()
    rho = 7.0
    ramp = [i / 9 for i in range(10)]
    lo, hi = full.min() ** (1 / rho), full.max() ** (1 / rho)
    expected = [(hi + r * (lo - hi)) ** rho for r in ramp]
    assert sigmas[:10].tolist() == pytest.approx([float(e) for e in expected], rel=1e-4)
    assert float(sigmas[-1]) == 0.0


def test_uniform_schedules_start_at_the_last_training_timestep() -> None:
    for family in ("sd15", "sdxl"):
        for sampler in ("Euler", "Euler a", "DPM++ 2M", "UniPC"):
            scheduler = make_scheduler(sampler, _base_config(family))
            scheduler.set_timesteps(20)
            assert int(scheduler.timesteps[0]) == 999, (family, sampler)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 3, 20])
def test_every_sampler_ends_finite(sampler: Sampler, steps: int) -> None:
    scheduler = make_scheduler(sampler, _base_config("sd15"))
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    sample = torch.randn(1, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma  # [B, C, h, w] latents
    for t in scheduler.timesteps:
        noise = 0.5 * torch.randn(1, 4, 8, 8, generator=generator)  # a stand-in UNet's epsilon prediction
        sample = scheduler.step(noise, t, scheduler.scale_model_input(sample, t), **extra).prev_sample
    assert torch.isfinite(sample).all()
