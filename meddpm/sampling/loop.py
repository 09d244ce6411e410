"""The sampling loop, the one every backend runs: a diffusers scheduler from the registry, driven by a denoiser.

    set the scheduler's timesteps -> for t in timesteps: eps = denoiser(x_t, t) -> x = scheduler.step(eps, t, x)

Every scheduler sees the predicted clean image x0 clipped to the model's range, as Med-DDPM clips it; the clipping
is folded into epsilon (`clip_x0_in_epsilon`) at the noise level the solver's update assumes (`step_alpha_bars`),
so one mechanism serves every solver. Where a preset sets `mask_prior_alpha_bar`, the steps at a noise level above
it (alpha-bar below it) take the mask's prior image as x0 instead (`mask_prior`), folded into epsilon the same way,
and call no UNet: there an epsilon model's x0 is its error amplified up to 5000 times (docs/fast-sampling.md).
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from meddpm.errors import Interrupted
from meddpm.model.presets import Preset
from meddpm.model.tensors import IMAGE_RANGE
from meddpm.sampling.denoiser import Denoiser
from meddpm.sampling.request import SamplingRequest
from meddpm.sampling.schedulers import make_scheduler

Progress = Callable[[int, int, float], None]  # (steps done, steps in all, seconds elapsed)


class Sampler(Protocol):
    """What runs the sampling loop for a pipeline: `DenoiserLoop` here, or the loop inside Triton
    (meddpm.backends.triton_client.server_loop.TritonServerLoop). `name` says which, for the record."""

    name: str

    def sample(
        self,
        condition: np.ndarray,
        request: SamplingRequest,
        preset: Preset,
        *,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> np.ndarray: ...


class DenoiserLoop:
    """The loop run in this process (`sample`), each step's UNet call made by `denoiser`."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.name = denoiser.name
        import diffusers.utils.torch_utils  # noqa: F401 (loaded now: the first mask's timings are then its own)

    def sample(
        self,
        condition: np.ndarray,
        request: SamplingRequest,
        preset: Preset,
        *,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> np.ndarray:
        return sample(self.denoiser, condition, request, preset, progress=progress, stop=stop)


def sample(
    denoiser: Denoiser,
    condition: np.ndarray,
    request: SamplingRequest,
    preset: Preset,
    *,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> np.ndarray:
    """Synthesise the request's samples for one condition (L, D, H, W) of `preset`; returns (samples, C, D, H, W)
    in the model's range. Setting `stop` ends the loop before its next step with `Interrupted`."""
    request.check(preset.schedule)
    scheduler = make_scheduler(request.scheduler, preset.schedule, request.steps)
    batch = request.samples
    conditions = np.ascontiguousarray(np.broadcast_to(condition, (batch, *condition.shape)), dtype=np.float32)
    x, generators = initial_noise((batch, preset.out_channels, *condition.shape[1:]), request.seeds)
    x = x * scheduler.init_noise_sigma
    alpha_bars = step_alpha_bars(scheduler)
    prior = mask_prior(conditions, preset) if preset.schedule.mask_prior_alpha_bar else None
    stochastic = noise_arguments(scheduler, generators)
    started = time.monotonic()
    with denoiser.conditioned(conditions) as predict_noise:
        for i, t in enumerate(scheduler.timesteps):
            if stop is not None and stop.is_set():
                raise Interrupted(f"stopped at step {i + 1} of {len(scheduler.timesteps)}; nothing was written")
            if prior is not None and not calls_unet(alpha_bars[i], preset):
                epsilon = epsilon_of_x0(prior.clone(), x, alpha_bars[i])
            else:
                timestep = np.full((batch,), float(t), dtype=np.float32)
                epsilon = torch.from_numpy(predict_noise(x.numpy(), timestep))
                epsilon = clip_x0_in_epsilon(epsilon, x, alpha_bars[i])
            x = scheduler.step(epsilon, t, x, **stochastic).prev_sample
            if progress is not None:
                progress(i + 1, len(scheduler.timesteps), time.monotonic() - started)
    return x.clamp_(*IMAGE_RANGE).numpy()


def initial_noise(shape: tuple[int, ...], seeds: list[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """x_T ~ N(0, I), one generator per sample: a sample depends on its own seed only."""
    # Imported here: diffusers' utilities import torch._dynamo (seconds), which a run that does not sample in this
    # process (the server-side loop's client, --help) need not pay; the schedulers import it in the same way.
    from diffusers.utils.torch_utils import randn_tensor

    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return randn_tensor(shape, generator=generators, dtype=torch.float32), generators


def clip_x0_in_epsilon(epsilon: torch.Tensor, sample: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """epsilon whose implied x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) is clipped to the model's range; in place."""
    sqrt_a, sqrt_one_minus_a = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
    x0 = epsilon.mul_(-sqrt_one_minus_a).add_(sample).div_(sqrt_a).clamp_(*IMAGE_RANGE)
    return epsilon_of_x0(x0, sample, alpha_bar)


def epsilon_of_x0(x0: torch.Tensor, sample: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """The epsilon for which the solver's update at noise level alpha-bar implies clean image `x0`; in place."""
    return x0.mul_(-(alpha_bar**0.5)).add_(sample).div_((1.0 - alpha_bar) ** 0.5)


def calls_unet(alpha_bar: float, preset: Preset) -> bool:
    """Whether the step at noise level alpha-bar calls the UNet; if not, it takes the mask's prior as x0."""
    return alpha_bar >= preset.schedule.mask_prior_alpha_bar


def mask_prior(conditions: np.ndarray, preset: Preset) -> torch.Tensor:
    """The clean image a mask alone implies, (samples, C, D, H, W): the training images' background where no label
    is set, mid-range (0) inside the labels. What the sampler trusts at noise levels where an epsilon model's x0 is
    amplified error (`mask_prior_alpha_bar`): each tissue's contrast is left to the steps that call the UNet."""
    labelled = torch.from_numpy(conditions > 0).any(dim=1, keepdim=True)  # "on": +1 (symmetric) or 1 (binary)
    prior = torch.where(labelled, 0.0, preset.image.background)
    return prior.expand(-1, preset.out_channels, -1, -1, -1).contiguous()


def step_alpha_bars(scheduler: Any) -> list[float]:
    """The alpha-bar each step's solver update assumes: its own noise level where it keeps one per step (which need
    not be a training timestep's), else the training schedule's at the step's timestep. The x0 clipping must use
    the same, or the solver's x0 escapes the model's range."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) == len(scheduler.timesteps) + 1:
        return (1.0 / (1.0 + sigmas[:-1].double() ** 2)).tolist()
    return scheduler.alphas_cumprod.double()[scheduler.timesteps.long()].tolist()


def noise_arguments(scheduler: Any, generators: list[torch.Generator]) -> dict:
    """What `scheduler.step` needs to draw its noise from the samples' own generators (nothing if it draws none)."""
    return {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
