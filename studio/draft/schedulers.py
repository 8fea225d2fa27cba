"""AUTOMATIC1111 sampler names → diffusers schedulers, built from the pipeline's own scheduler config."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from studio.types import Sampler

# A1111 name → (scheduler class, config overrides). "DPM++ SDE Karras" is the stochastic DPM-Solver++
# with Karras sigmas; diffusers' multistep solver in "sde-dpmsolver++" mode reproduces it without torchsde.
_SCHEDULERS: dict[Sampler, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "DPM++ SDE Karras": (
        DPMSolverMultistepScheduler,
        {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
    ),
    "DDIM": (DDIMScheduler, {}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "LCM": (LCMScheduler, {}),
}


def make_scheduler(sampler: Sampler, base_config: Any) -> SchedulerMixin:
    """A fresh scheduler for ``sampler`` configured like the model's own scheduler."""
    cls, overrides = _SCHEDULERS[sampler]
    return cls.from_config(base_config, **overrides)
