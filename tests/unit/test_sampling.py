"""The sampling loop: DDPM equals Med-DDPM's sampler step by step; seeds reproduce; every solver runs."""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from meddpm.backends.onnxruntime_denoiser import OnnxRuntimeDenoiser
from meddpm.backends.pytorch_denoiser import TorchDenoiser
from meddpm.errors import ConfigurationError
from meddpm.model.presets import Preset, Scheduler, get_preset
from meddpm.model.unet import ConditionalDenoiser, build_unet
from meddpm.sampling.denoiser import Denoiser
from meddpm.sampling.loop import clip_x0_in_epsilon, mask_prior, sample, step_alpha_bars
from meddpm.sampling.request import SamplingRequest
from meddpm.sampling.schedulers import SCHEDULERS, make_scheduler
from tests.conftest import randomise
from tests.helpers import cosine_betas

WHOLE_HEAD = get_preset("whole-head")
BRATS = get_preset("brats")  # four output channels, binary condition
SCHEDULE = WHOLE_HEAD.schedule


class ScaledSample(Denoiser):
    """The fake model of diffusers' scheduler tests: eps = x * t / (t + 1), shifted by the condition."""

    name = "fake"

    @contextlib.contextmanager
    def conditioned(self, condition):
        def predict_noise(noisy_image, timestep):
            t = timestep.reshape(-1, 1, 1, 1, 1)
            return (noisy_image * t / (t + 1) + 0.1 * condition[:, :1]).astype(np.float32)

        yield predict_noise


def fake_run(scheduler, steps, seed, samples=1, condition=None, **options):
    """The loop with the fake model on an (8, 8, 8) grid, as the whole-head preset's single channel."""
    condition = np.zeros((2, 8, 8, 8), dtype=np.float32) if condition is None else condition
    return sample(ScaledSample(), condition, SamplingRequest(scheduler, steps, seed, samples), WHOLE_HEAD, **options)


def test_ddpm_step_is_meddpm_posterior_at_every_timestep():
    """x0 = clip(sqrt(1/a) x_t - sqrt(1/a - 1) eps); mean = c1 x0 + c2 x_t; variance = posterior variance."""
    betas = cosine_betas()
    alphas = 1 - betas
    a_bar = np.cumprod(alphas)
    a_prev = np.append(1.0, a_bar[:-1])
    coef1 = betas * np.sqrt(a_prev) / (1 - a_bar)
    coef2 = (1 - a_prev) * np.sqrt(alphas) / (1 - a_bar)
    variance = betas * (1 - a_prev) / (1 - a_bar)

    scheduler = make_scheduler("ddpm", SCHEDULE, 250)
    assert scheduler.timesteps.tolist() == list(range(249, -1, -1))
    rng = np.random.default_rng(0)
    worst_mean, worst_std = 0.0, 0.0
    for t in range(250):
        x_t = torch.from_numpy(rng.normal(size=(1, 1, 6, 6, 6)).astype(np.float32))
        eps = torch.from_numpy(
            rng.normal(scale=2.0, size=(1, 1, 6, 6, 6)).astype(np.float32)
        )  # large: clipping engages
        x0 = np.clip(
            np.sqrt(1 / a_bar[t]) * x_t.double().numpy() - np.sqrt(1 / a_bar[t] - 1) * eps.double().numpy(), -1, 1
        )
        mean = coef1[t] * x0 + coef2[t] * x_t.double().numpy()

        folded = clip_x0_in_epsilon(eps, x_t, float(scheduler.alphas_cumprod[t]))
        outs, noises = [], []
        for seed in (1, 2):
            outs.append(
                scheduler.step(folded, t, x_t, generator=torch.Generator().manual_seed(seed)).prev_sample.double()
            )
            noises.append(randn_tensor(x_t.shape, generator=torch.Generator().manual_seed(seed)).double())
        if t == 0:  # no noise at the last step
            ours_mean, ours_std = outs[0], torch.zeros(1)
            assert torch.equal(outs[0], outs[1])
        else:
            ours_std = ((outs[0] - outs[1]) / (noises[0] - noises[1])).median()
            ours_mean = outs[0] - ours_std * noises[0]
        worst_mean = max(worst_mean, float(np.abs(ours_mean.numpy() - mean).max()))
        worst_std = max(worst_std, abs(float(ours_std) - np.sqrt(variance[t])))
    assert worst_mean < 2e-4, worst_mean  # float32 coefficients vs the reference's float64
    assert worst_std < 1e-5, worst_std


def test_x0_clipping_leaves_in_range_predictions_alone():
    x = torch.randn(1, 1, 4, 4, 4) * 0.1
    eps = torch.randn(1, 1, 4, 4, 4) * 0.1
    a = 0.9
    x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
    assert x0.abs().max() < 1
    torch.testing.assert_close(clip_x0_in_epsilon(eps.clone(), x, a), eps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheduler", ["dpmpp2m", "deis", "dpmpp2m-sde"])  # the solvers that keep noise levels
def test_clipping_uses_the_noise_level_the_solver_steps_from(scheduler):
    solver = make_scheduler(scheduler, SCHEDULE, 20)
    x = torch.randn(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(1)) * 3.0  # x0 far outside [-1, 1]
    for sigma, alpha_bar in zip(solver.sigmas[:-1].double(), step_alpha_bars(solver)):
        folded = clip_x0_in_epsilon(eps.clone().double(), x.double(), alpha_bar)
        alpha_t = 1.0 / (sigma**2 + 1.0) ** 0.5  # the solver's own x0 = (x - sigma_t eps) / alpha_t
        x0 = (x.double() - sigma * alpha_t * folded) / alpha_t
        assert x0.abs().max() <= 1.0 + 1e-6, (float(sigma), float(x0.abs().max()))


@pytest.mark.parametrize("steps", [1, 2, 10, 15, 20, 25, 50, 249, 250])
def test_fast_path_steps_from_training_timesteps_at_the_noise_levels_trained(steps):
    solver = make_scheduler("dpmpp2m-sde", SCHEDULE, steps)
    timesteps = solver.timesteps.tolist()
    assert len(timesteps) == steps and timesteps == sorted(set(timesteps), reverse=True)
    assert timesteps[0] == 249 and (steps == 1 or timesteps[-1] == 0)
    trained = ((1 - solver.alphas_cumprod) / solver.alphas_cumprod).sqrt()[solver.timesteps]
    torch.testing.assert_close(solver.sigmas[:-1], trained)
    if steps == 20:  # crowded at high noise as Karras et al. space them: 7 of 20 steps above t = 240
        assert sum(t > 240 for t in timesteps) == 7 and sum(t < 50 for t in timesteps) == 4


@pytest.mark.parametrize("scheduler", Scheduler)
def test_every_scheduler_runs_and_stays_in_range(scheduler):
    condition = np.ones((2, 8, 8, 8), dtype=np.float32)
    calls = []
    images = fake_run(
        scheduler,
        10,
        seed=3,
        samples=2,
        condition=condition,
        progress=lambda done, total, elapsed: calls.append((done, total)),
    )
    assert images.shape == (2, 1, 8, 8, 8) and np.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1
    assert calls[-1] == (10, 10) and len(calls) == 10


@pytest.mark.parametrize("scheduler", Scheduler)
def test_seeded_runs_are_bit_for_bit_reproducible(scheduler):
    first = fake_run(scheduler, 8, seed=11, samples=2)  # seeds 11, 12
    again = fake_run(scheduler, 8, seed=11, samples=2)
    other = fake_run(scheduler, 8, seed=10, samples=2)  # seeds 10, 11
    assert np.array_equal(first, again)
    assert not np.array_equal(first[0], other[0]) and np.array_equal(first[0], other[1])


@pytest.mark.parametrize("scheduler", ["ddpm", "dpmpp2m-sde"])  # both draw noise every step
def test_sample_depends_on_its_own_seed_not_on_its_batch(scheduler):
    pair = fake_run(scheduler, 20, seed=5, samples=2)
    alone = fake_run(scheduler, 20, seed=6)
    np.testing.assert_allclose(pair[1], alone[0], atol=1e-6)


class CountingDenoiser(ScaledSample):
    """The fake model, recording the timestep of each UNet call."""

    def __init__(self):
        self.timesteps = []

    @contextlib.contextmanager
    def conditioned(self, condition):
        with super().conditioned(condition) as predict_noise:

            def counted(noisy_image, timestep):
                self.timesteps.append(int(timestep[0]))
                return predict_noise(noisy_image, timestep)

            yield counted


@pytest.mark.parametrize(("scheduler", "steps"), [("ddpm", 250), ("dpmpp2m-sde", 20)])
def test_above_the_mask_priors_noise_level_the_loop_trusts_the_mask_and_calls_no_unet(scheduler, steps):
    """A preset's mask_prior_alpha_bar: each step whose alpha-bar is below it takes the mask's prior image as x0 and
    makes no UNet call; every other step makes one."""
    threshold = 0.01
    preset = dataclasses.replace(WHOLE_HEAD, schedule=dataclasses.replace(SCHEDULE, mask_prior_alpha_bar=threshold))
    condition = -np.ones((2, 8, 8, 8), dtype=np.float32)
    condition[0, 2:6, 2:6, 2:6] = 1.0
    denoiser = CountingDenoiser()
    images = sample(denoiser, condition, SamplingRequest(scheduler, steps, 4), preset)
    solver = make_scheduler(scheduler, SCHEDULE, steps)
    trusted = [int(t) for t, a in zip(solver.timesteps, step_alpha_bars(solver)) if a >= threshold]
    assert denoiser.timesteps == trusted and 0 < len(trusted) < len(solver.timesteps)
    assert images.shape == (1, 1, 8, 8, 8) and np.isfinite(images).all()


@pytest.mark.parametrize("scale", ["symmetric", "binary"])
def test_the_mask_prior_is_background_outside_the_labels_and_mid_range_inside(scale):
    off, on = (-1.0, 1.0) if scale == "symmetric" else (0.0, 1.0)
    conditions = np.full((2, 3, 4, 4, 4), off, dtype=np.float32)  # 2 samples, 3 labels
    conditions[:, 1, :2] = on
    conditions[:, 2, :, :1] = on
    prior = mask_prior(
        conditions, dataclasses.replace(BRATS, condition=dataclasses.replace(BRATS.condition, scale=scale))
    )
    assert prior.shape == (2, BRATS.out_channels, 4, 4, 4)
    labelled = np.zeros((4, 4, 4), dtype=bool)
    labelled[:2] = labelled[:, :1] = True
    expected = np.where(labelled, 0.0, BRATS.image.background)
    assert all(np.array_equal(prior[i, c].numpy(), expected) for i in range(2) for c in range(BRATS.out_channels))


def test_a_mask_prior_level_that_is_no_alpha_bar_is_refused():
    table = WHOLE_HEAD.to_dict()
    table["schedule"]["mask_prior_alpha_bar"] = 1.5
    with pytest.raises(ConfigurationError, match="mask_prior_alpha_bar is an alpha-bar"):
        Preset.from_dict("broken", table)


def test_bad_scheduler_settings_are_refused():
    with pytest.raises(ConfigurationError, match="unknown scheduler 'euler'; choose one of ddpm, ddim"):
        make_scheduler("euler", SCHEDULE, 10)
    with pytest.raises(ConfigurationError, match="--steps 300 is out of range.*1..250"):
        fake_run(Scheduler.DDIM, 300, seed=0)
    with pytest.raises(
        ConfigurationError, match="seed 9223372036854775807 with 2 sample.*choose a seed from 0 to 9223372036854775806"
    ):
        fake_run(Scheduler.DDIM, 3, seed=2**63 - 1, samples=2)


def test_onnxruntime_and_torch_backends_give_the_same_volume(presets, tmp_path):
    from export.onnx_graph import export_onnx

    preset = presets["tiny"]
    model = ConditionalDenoiser(randomise(build_unet(preset), seed=8, scale=0.1)).eval()
    export_onnx(model, preset, tmp_path / "m.onnx")
    condition = np.stack([np.ones((16, 16, 16)), -np.ones((16, 16, 16))]).astype(np.float32)
    runs = [
        sample(d, condition, SamplingRequest(Scheduler.DPMPP2M, 6, seed=21), preset)
        for d in (TorchDenoiser(model), OnnxRuntimeDenoiser(tmp_path / "m.onnx", threads=1))
    ]
    difference = np.abs(runs[0] - runs[1])  # float32 round-off, amplified where x0 meets the clip at +-1
    assert difference.max() < 1e-3 and difference.mean() < 1e-5, (difference.max(), difference.mean())


def test_every_scheduler_name_has_one_registry_entry_and_requests_keep_the_seed_rule():
    assert list(SCHEDULERS) == list(Scheduler)
    request = SamplingRequest(Scheduler.DDPM, 10, seed=7, samples=5)
    assert request.seeds == [7, 8, 9, 10, 11]
    assert [r.seeds for r in request.batches(2)] == [[7, 8], [9, 10], [11]]


def test_a_mistyped_choice_is_refused_naming_the_nearest_and_every_allowed_value():
    from meddpm.choices import parse_choice
    from meddpm.model.presets import Scheduler

    with pytest.raises(ValueError, match=r"'dpmpp2m_sde' is not a scheduler \(did you mean 'dpmpp2m-sde'\?\); choose"):
        parse_choice(Scheduler, "dpmpp2m_sde", "scheduler")
    with pytest.raises(ValueError, match=r"'euler' is not a scheduler; choose one of ddpm, ddim, dpmpp2m, deis"):
        parse_choice(Scheduler, "euler", "scheduler")
    assert parse_choice(Scheduler, "ddim", "scheduler") is Scheduler.DDIM


class NotANumber(ScaledSample):
    name = "nan"

    @contextlib.contextmanager
    def conditioned(self, condition):
        yield lambda noisy_image, timestep: np.full_like(noisy_image, np.nan)


def test_the_pipeline_gives_volumes_on_the_masks_grid_whatever_the_batch(demo_repository):
    """The core's per-mask pipeline: a mask on its own (oblique, 5 mm) grid in, one volume per seed on that grid
    out, the same whatever the batch size; a stop ends it before a step, a model's NaN is a ModelError."""
    from meddpm.dicom.phantom_study import oblique_affine
    from meddpm.errors import Interrupted, ModelError
    from meddpm.imaging.masks import LabelMask
    from meddpm.imaging.phantom_heads import make_phantom
    from meddpm.model.served_model import find_model
    from meddpm.sampling.loop import DenoiserLoop
    from meddpm.synthesis import SynthesisPipeline

    model = find_model(demo_repository)
    labels, _ = make_phantom(np.random.default_rng(2), (30, 36, 33), 5.0)
    mask = LabelMask("head", labels, oblique_affine(labels.shape, 5.0), "head.nii.gz")
    request = SamplingRequest(Scheduler.DDIM, 3, seed=4, samples=3)
    one, three = (SynthesisPipeline(model, DenoiserLoop(ScaledSample()), size)(mask, request) for size in (1, 3))
    assert [v.shape for v in one.samples] == [(1, 30, 36, 33)] * 3
    assert all(np.array_equal(a, b) for a, b in zip(one.samples, three.samples))
    assert not np.array_equal(one.samples[0], one.samples[1])  # seeds 4, 5, 6
    assert one.record["seeds"] == [4, 5, 6] and one.record["backend"] == "fake" and one.record["grid"]["resampled"]
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted, match="stopped at step 1 of 3"):
        SynthesisPipeline(model, DenoiserLoop(ScaledSample()))(mask, request, stop=stop)
    with pytest.raises(ModelError, match=r"model\.onnx: the model computed non-finite values"):
        SynthesisPipeline(model, DenoiserLoop(NotANumber()))(mask, request)
