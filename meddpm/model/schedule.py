"""The noise schedule of a preset, and the buffers Med-DDPM stores with it in its checkpoints."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler

from meddpm.model.presets import ScheduleConfig

# Buffers of Med-DDPM's GaussianDiffusion wrapper, in the order its state dict lists them.
BUFFER_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_mean_coef3",
)


def betas(schedule: ScheduleConfig) -> torch.Tensor:
    """The training betas as diffusers computes them for this schedule (float32)."""
    scheduler: Any = DDPMScheduler(num_train_timesteps=schedule.timesteps, beta_schedule=schedule.beta_schedule)
    return scheduler.betas.clone()


def meddpm_buffers(betas_: torch.Tensor) -> dict[str, torch.Tensor]:
    """The schedule buffers Med-DDPM registers for `betas`, computed in float64, stored as float32."""
    b = betas_.double().numpy()
    alphas = 1.0 - b
    a_bar = np.cumprod(alphas)
    a_bar_prev = np.append(1.0, a_bar[:-1])
    posterior_variance = b * (1.0 - a_bar_prev) / (1.0 - a_bar)
    coef2 = (1.0 - a_bar_prev) * np.sqrt(alphas) / (1.0 - a_bar)
    values = {
        "betas": b,
        "alphas_cumprod": a_bar,
        "alphas_cumprod_prev": a_bar_prev,
        "sqrt_alphas_cumprod": np.sqrt(a_bar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - a_bar),
        "log_one_minus_alphas_cumprod": np.log(1.0 - a_bar),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / a_bar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / a_bar - 1.0),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": b * np.sqrt(a_bar_prev) / (1.0 - a_bar),
        "posterior_mean_coef2": coef2,
        "posterior_mean_coef3": 1.0 - coef2,
    }
    return {name: torch.tensor(values[name], dtype=torch.float32) for name in BUFFER_NAMES}
