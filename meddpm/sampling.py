"""The sampling loop: diffusers schedulers configured with a preset's schedule, driven by a denoiser.

Schedulers (all epsilon prediction, on the preset's training schedule):
- "ddpm": ancestral DDPM exactly as Med-DDPM samples (posterior mean, "fixed small" variance);
- "ddim": deterministic DDIM (eta 0);
- "dpmpp2m": DPM-Solver++ (2M), multistep, second order;
- "deis": DEIS multistep, third order: the family of Med-DDPM's iPNDM fast sampler;
- "dpmpp2m-sde": DPM-Solver++ (2M) SDE, stochastic, on training timesteps spaced as Karras et al.'s noise
  levels, which crowd the steps at the highest noise: the fast path. An epsilon model's x0 estimate there is
  mostly amplified error (x0 gets eps's error times sqrt((1 - a) / a), about 5000 at Med-DDPM's t = 249);
  deterministic solvers carry it into the image as speckle and intensity offsets, while this solver's small
  stochastic steps wash it out, as DDPM-250 does (`python -m benchmarks.quality` measures it).
Every scheduler sees the predicted clean image x0 clipped to [-1, 1], as Med-DDPM clips it; the clipping is
folded into epsilon (`clip_x0_in_epsilon`) at the noise level the solver's update assumes (`step_alpha_bars`),
so one mechanism serves every solver.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from meddpm.denoisers import Denoiser
from meddpm.errors import ConfigurationError, Interrupted
from meddpm.presets import SCHEDULERS, ScheduleConfig

Progress = Callable[[int, int, float], None]  # (steps done, steps in all, seconds elapsed)
log = logging.getLogger(__name__)


def make_scheduler(name: str, schedule: ScheduleConfig, steps: int) -> Any:
    """A fresh scheduler set to `steps` steps (multistep solvers keep state: one per sampling run)."""
    check_steps(name, steps, schedule)
    common = dict(num_train_timesteps=schedule.timesteps, beta_schedule=schedule.beta_schedule, prediction_type="epsilon")
    if name == "ddpm":
        scheduler = DDPMScheduler(**common, variance_type="fixed_small", clip_sample=False)
    elif name == "ddim":
        scheduler = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    elif name == "dpmpp2m":
        scheduler = DPMSolverMultistepScheduler(
            **common, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True, timestep_spacing="trailing"
        )
    elif name == "deis":
        scheduler = DEISMultistepScheduler(**common, solver_order=3, lower_order_final=True, timestep_spacing="trailing")
    elif name == "dpmpp2m-sde":
        scheduler = DPMSolverMultistepScheduler(
            **common, algorithm_type="sde-dpmsolver++", solver_order=2, lower_order_final=True
        )
        scheduler.set_timesteps(timesteps=karras_timesteps(scheduler.alphas_cumprod, steps))
        return scheduler
    else:
        raise ConfigurationError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    scheduler.set_timesteps(steps)
    return scheduler


def karras_timesteps(alphas_cumprod: torch.Tensor, steps: int, rho: float = 7.0) -> list[int]:
    """`steps` training timesteps, high to low, spaced as Karras et al.'s noise levels: levels from the schedule's
    highest noise to its lowest, each moved to the nearest training timestep, duplicates merged, and as many
    levels drawn as it takes to leave `steps` timesteps. diffusers' own Karras levels fall between the timesteps
    of Med-DDPM's short cosine schedule, where the model was never trained; on the demo model they scatter the
    samples' Dice about four times as far from DDPM-250's (README, "Fast sampling")."""
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


# Steps when a scheduler is asked for without --steps and is not the preset's own default. dpmpp2m-sde: the
# fast path, 20 steps, the fewest within 0.02 Dice of DDPM-250 on 96 held-out samples of the demo model (15
# misses by a hair, 10 collapses; README, "Fast sampling"). The deterministic solvers reach DDPM-250 at no step
# count up to 50 on that model; their defaults are the common ones.
FAST_DEFAULT_STEPS = {"ddim": 50, "dpmpp2m": 20, "deis": 20, "dpmpp2m-sde": 20}


def default_steps(name: str, schedule: ScheduleConfig) -> int:
    if name == schedule.default_scheduler:
        return schedule.default_steps
    return FAST_DEFAULT_STEPS.get(name, schedule.timesteps)


def check_steps(name: str, steps: int, schedule: ScheduleConfig) -> None:
    if not 1 <= steps <= schedule.timesteps:
        raise ConfigurationError(
            f"--steps {steps} is out of range for scheduler '{name}': use 1..{schedule.timesteps} "
            f"(the model was trained with {schedule.timesteps} timesteps)"
        )


def clip_x0_in_epsilon(epsilon: torch.Tensor, sample: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """epsilon whose implied x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) is clipped to [-1, 1]; in place, in `epsilon`."""
    sqrt_a, sqrt_one_minus_a = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
    x0 = epsilon.mul_(-sqrt_one_minus_a).add_(sample).div_(sqrt_a).clamp_(-1.0, 1.0)
    return x0.mul_(-sqrt_a).add_(sample).div_(sqrt_one_minus_a)


MAX_SEED = 2**63 - 1  # torch generators take 64 bits; the server-side loop passes a seed as a gRPC int64


def initial_noise(shape: tuple[int, ...], seeds: list[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """x_T ~ N(0, I), one generator per sample: a sample depends on its own seed only."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return randn_tensor(shape, generator=generators, dtype=torch.float32), generators


def step_alpha_bars(scheduler: Any) -> list[float]:
    """The alpha-bar each step's solver update assumes: its own noise level where it keeps one per step (which need
    not be a training timestep's), else the training schedule's at the step's timestep. The x0 clipping must use
    the same, or the solver's x0 escapes [-1, 1]."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) == len(scheduler.timesteps) + 1:
        return (1.0 / (1.0 + sigmas[:-1].double() ** 2)).tolist()
    return scheduler.alphas_cumprod.double()[scheduler.timesteps.long()].tolist()


def noise_arguments(scheduler: Any, generators: list[torch.Generator]) -> dict:
    """What `scheduler.step` needs to draw its noise from the samples' own generators (nothing if it draws none)."""
    return {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}


def sample(
    denoiser: Denoiser,
    condition: np.ndarray,
    out_channels: int,
    scheduler_name: str,
    steps: int,
    schedule: ScheduleConfig,
    seeds: list[int],
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> np.ndarray:
    """Synthesise len(seeds) images for one condition (L, D, H, W); returns (B, C, D, H, W) in [-1, 1].

    Setting `stop` ends the loop before its next step with `Interrupted`.
    """
    scheduler = make_scheduler(scheduler_name, schedule, steps)
    batch = len(seeds)
    conditions = np.ascontiguousarray(np.broadcast_to(condition, (batch, *condition.shape)), dtype=np.float32)
    x, generators = initial_noise((batch, out_channels, *condition.shape[1:]), seeds)
    x = x * scheduler.init_noise_sigma
    alpha_bars = step_alpha_bars(scheduler)
    stochastic = noise_arguments(scheduler, generators)
    started = time.monotonic()
    with denoiser.conditioned(conditions) as predict_noise:
        for i, t in enumerate(scheduler.timesteps):
            if stop is not None and stop.is_set():
                raise Interrupted(f"stopped at step {i + 1} of {len(scheduler.timesteps)}; nothing was written")
            timestep = np.full((batch,), float(t), dtype=np.float32)
            epsilon = torch.from_numpy(predict_noise(x.numpy(), timestep))
            epsilon = clip_x0_in_epsilon(epsilon, x, alpha_bars[i])
            x = scheduler.step(epsilon, t, x, **stochastic).prev_sample
            if progress is not None:
                progress(i + 1, len(scheduler.timesteps), time.monotonic() - started)
    return x.clamp_(-1.0, 1.0).numpy()
