"""AUTOMATIC1111 sampler names → diffusers schedulers, built from the pipeline's own scheduler config.

Each entry pins every setting that makes it that sampler, so a model whose own scheduler config sets, say,
``use_karras_sigmas`` or ``algorithm_type`` cannot turn one sampler into another. The k-diffusion samplers
(Euler, Euler a, DPM++ 2M) use evenly spaced timesteps from 999 down ("linspace"), as A1111's default
(uniform) schedule does, also for SDXL whose config says "leading"; Karras entries use Karras sigmas (rho 7)
between the model's own sigma_min and sigma_max, as A1111 does.

- "DPM++ 2M SDE Karras" is k-diffusion's ``sample_dpmpp_2m_sde`` (2nd order, midpoint, eta 1) with Karras
  sigmas: diffusers' multistep solver in "sde-dpmsolver++" mode. Its noise is Gaussian per step where A1111
  draws from a Brownian tree (torchsde), so A1111 and studio images differ in detail, not in kind.
- "DPM++ SDE Karras" (k-diffusion ``sample_dpmpp_sde``, diffusers' ``DPMSolverSDEScheduler``) needs torchsde,
  which studio does not install, so it is not offered.
- "UniPC" uses A1111's defaults: variant bh1, order 3, lower order final steps, data prediction,
  time-uniform steps from t = 1 to t = 1/1000 ("linspace", ending at the model's smallest sigma,
  "sigma_min", not at 0: diffusers' bh1 update divides by zero on a last step to sigma 0).
- "DDIM" is A1111's: eta 0, timesteps ``range(0, 1000, 1000 // steps) + 1`` ("leading", offset 1), the
  first step's previous alpha taken from timestep 0 (``set_alpha_to_one=False``), no sample clipping.
"""

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

_UNIFORM = {"timestep_spacing": "linspace"}  # A1111's default k-diffusion schedule: t = 999 .. 0 evenly
_NO_SIGMA_SCHEDULE = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_KARRAS = {"use_karras_sigmas": True, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_DPMPP_2M = {"solver_order": 2, "solver_type": "midpoint", "lower_order_final": True}

# A1111 name → (scheduler class, config overrides applied over the model's own scheduler config).
SCHEDULERS: dict[Sampler, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "Euler a": (EulerAncestralDiscreteScheduler, {**_UNIFORM}),
    "Euler": (EulerDiscreteScheduler, {**_UNIFORM, **_NO_SIGMA_SCHEDULE}),
    "DPM++ 2M": (
        DPMSolverMultistepScheduler,
        {**_UNIFORM, **_NO_SIGMA_SCHEDULE, **_DPMPP_2M, "algorithm_type": "dpmsolver++"},
    ),
    "DPM++ 2M Karras": (
        DPMSolverMultistepScheduler,
        {**_UNIFORM, **_KARRAS, **_DPMPP_2M, "algorithm_type": "dpmsolver++"},
    ),
    "DPM++ 2M SDE Karras": (
        DPMSolverMultistepScheduler,
        {**_UNIFORM, **_KARRAS, **_DPMPP_2M, "algorithm_type": "sde-dpmsolver++"},
    ),
    "DDIM": (
        DDIMScheduler,
        {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False},
    ),
    "UniPC": (
        UniPCMultistepScheduler,
        {
            **_UNIFORM,
            **_NO_SIGMA_SCHEDULE,
            "solver_type": "bh1",
            "solver_order": 3,
            "lower_order_final": True,
            "predict_x0": True,
            "final_sigmas_type": "sigma_min",
        },
    ),
    "LCM": (LCMScheduler, {}),
}


def make_scheduler(sampler: Sampler, base_config: Any) -> SchedulerMixin:
    """A fresh scheduler for ``sampler`` configured like the model's own scheduler."""
    cls, overrides = SCHEDULERS[sampler]
    return cls.from_config(base_config, **overrides)
