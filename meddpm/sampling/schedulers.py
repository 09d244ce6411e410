"""The schedulers, one registry: each name's diffusers scheduler, configured with a preset's training schedule,
and its default step count.

All are epsilon prediction, on the preset's training schedule:
- "ddpm": ancestral DDPM exactly as Med-DDPM samples (posterior mean, "fixed small" variance);
- "ddim": deterministic DDIM (eta 0);
- "dpmpp2m": DPM-Solver++ (2M), multistep, second order;
- "deis": DEIS multistep, third order: the family of Med-DDPM's iPNDM fast sampler;
- "dpmpp2m-sde": DPM-Solver++ (2M) SDE, stochastic, on training timesteps spaced as Karras et al.'s noise
  levels, which crowd the steps at the highest noise: the fast path. An epsilon model's x0 estimate there is
  mostly amplified error (x0 gets eps's error times sqrt((1 - a) / a), about 5000 at Med-DDPM's t = 249);
  deterministic solvers carry it into the image as speckle and intensity offsets, while this solver's small
  stochastic steps wash it out, as DDPM-250 does (`python -m benchmarks.quality` measures it).
Multistep solvers keep state: `make_scheduler` gives a fresh one per sampling run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from meddpm.errors import ConfigurationError
from meddpm.model.presets import ScheduleConfig, Scheduler

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class SchedulerEntry:
    build: Callable[[dict[str, Any], int], Any]  # (common diffusers settings, steps) -> a scheduler set to steps
    default_steps: int | None  # without --steps, unless it is the preset's own scheduler; None: every timestep


def _ddpm(common: dict[str, Any], steps: int) -> Any:
    from diffusers import DDPMScheduler

    scheduler: Any = DDPMScheduler(**common, variance_type="fixed_small", clip_sample=False)
    scheduler.set_timesteps(steps)
    return scheduler


def _ddim(common: dict[str, Any], steps: int) -> Any:
    from diffusers import DDIMScheduler

    scheduler: Any = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    return scheduler


def _dpmpp2m(common: dict[str, Any], steps: int) -> Any:
    from diffusers import DPMSolverMultistepScheduler

    scheduler: Any = DPMSolverMultistepScheduler(
        **common, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True, timestep_spacing="trailing"
    )
    scheduler.set_timesteps(steps)
    return scheduler


def _deis(common: dict[str, Any], steps: int) -> Any:
    from diffusers import DEISMultistepScheduler

    scheduler: Any = DEISMultistepScheduler(
        **common, solver_order=3, lower_order_final=True, timestep_spacing="trailing"
    )
    scheduler.set_timesteps(steps)
    return scheduler


def _dpmpp2m_sde(common: dict[str, Any], steps: int) -> Any:
    from diffusers import DPMSolverMultistepScheduler

    scheduler: Any = DPMSolverMultistepScheduler(
        **common, algorithm_type="sde-dpmsolver++", solver_order=2, lower_order_final=True
    )
    scheduler.set_timesteps(timesteps=karras_timesteps(scheduler.alphas_cumprod, steps))
    return scheduler


# Default steps of the fast schedulers. dpmpp2m-sde: the fast path, 20 steps, the fewest within 0.02 Dice of
# DDPM-250 on 96 held-out samples of the demo model (15 misses by a hair, 10 collapses; docs/fast-sampling.md).
# The deterministic solvers reach DDPM-250 at no step count up to 50 on that model; their defaults are the common ones.
SCHEDULERS: dict[Scheduler, SchedulerEntry] = {
    Scheduler.DDPM: SchedulerEntry(_ddpm, None),
    Scheduler.DDIM: SchedulerEntry(_ddim, 50),
    Scheduler.DPMPP2M: SchedulerEntry(_dpmpp2m, 20),
    Scheduler.DEIS: SchedulerEntry(_deis, 20),
    Scheduler.DPMPP2M_SDE: SchedulerEntry(_dpmpp2m_sde, 20),
}


def make_scheduler(name: Scheduler | str, schedule: ScheduleConfig, steps: int) -> Any:
    """A fresh scheduler set to `steps` steps (multistep solvers keep state: one per sampling run)."""
    if name not in SCHEDULERS:
        raise ConfigurationError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    check_steps(name, steps, schedule)
    common = dict(
        num_train_timesteps=schedule.timesteps, beta_schedule=schedule.beta_schedule, prediction_type="epsilon"
    )
    return SCHEDULERS[Scheduler(name)].build(common, steps)


def default_steps(name: Scheduler, schedule: ScheduleConfig) -> int:
    """Steps when none are asked for: the preset's for its own scheduler, else the registry's."""
    if name == schedule.default_scheduler:
        return schedule.default_steps
    return SCHEDULERS[name].default_steps or schedule.timesteps


def check_steps(name: str, steps: int, schedule: ScheduleConfig) -> None:
    if not 1 <= steps <= schedule.timesteps:
        raise ConfigurationError(
            f"--steps {steps} is out of range for scheduler '{name}': use 1..{schedule.timesteps} "
            f"(the model was trained with {schedule.timesteps} timesteps)"
        )


def karras_timesteps(alphas_cumprod: torch.Tensor, steps: int, rho: float = 7.0) -> list[int]:
    """`steps` training timesteps, high to low, spaced as Karras et al.'s noise levels: levels from the schedule's
    highest noise to its lowest, each moved to the nearest training timestep, duplicates merged, and as many
    levels drawn as it takes to leave `steps` timesteps. diffusers' own Karras levels fall between the timesteps
    of Med-DDPM's short cosine schedule, where the model was never trained; on the demo model they scatter the
    samples' Dice about four times as far from DDPM-250's (docs/fast-sampling.md)."""
    log_sigmas = 0.5 * np.log(((1.0 - alphas_cumprod) / alphas_cumprod).double().numpy())
    top, bottom = np.exp(log_sigmas[-1]) ** (1.0 / rho), np.exp(log_sigmas[0]) ** (1.0 / rho)
    levels = steps
    while True:
        sigmas = (top + np.linspace(0.0, 1.0, levels) * (bottom - top)) ** rho
        nearest = np.abs(log_sigmas[None, :] - np.log(sigmas)[:, None]).argmin(axis=1)
        timesteps = list(dict.fromkeys(nearest.tolist()))
        if len(timesteps) >= steps:
            return timesteps
        levels += 1
