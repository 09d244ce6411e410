"""Train a demo model and save it in Med-DDPM's checkpoint layout; a run can stop and resume.

    python -m training.train_demo --preset mni152-demo --steps 1200 --batch 2 --lr 5e-4 --echo 2 --min-snr-gamma 5 \
        --input-perturbation 0.1 --whole-head-share 0.2 --seed 5 --init EARLIER.pt --out models/mni152-demo/model.pt
        # the last of the committed weights' four runs (stopped with --until 900): the README's "The demo model"
    python -m training.train_demo --preset demo --steps 3000 --batch 4 --out models/demo/model_demo.pt

Two demo presets (meddpm/model/presets.toml), each with its own heads (meddpm/imaging/demo_heads.py):
- `mni152-demo`: 64^3 at 3 mm, heads drawn from the MNI152 template (meddpm/imaging/template_heads.py);
- `demo`: 32^3 at 6 mm, procedural head phantoms (meddpm/imaging/phantom_heads.py), for the tests.

Training is Med-DDPM's objective: epsilon prediction with a uniformly drawn timestep, mean squared error, on the
preset's cosine schedule (optionally weighted by Min-SNR, `--min-snr-gamma 5`, which on this schedule lowers the
weight of the timesteps below about 60, whose images are nearly clean); the saved weights are an exponential moving
average, as Med-DDPM samples with. `--input-perturbation 0.1` noises the training images with slightly more noise
than the target (Ning et al., ICML 2023, as diffusers' training scripts do): a sampler's own intermediate images are
off the training distribution, and a model trained only on exact ones carries their error forward (exposure bias: an
early model drew the background at -0.6 instead of -1, though it denoised real images well). The batch of step s is
drawn from seed [seed, s], so a resumed run sees what an unbroken one would. Every `--save-every` steps the model
(`--out`) and the run's state (`--out` + `.state.pt`: weights, average, optimiser, step) are written whole; run the
same command again to resume (`--until STEP` stops a run there on purpose, e.g. at the end of a working session). A
GPU is used when present; on a CPU with native BF16 the forward and backward passes run under BF16 autocast (1.8x
faster on 2 cores at 64^3, measured side by side on an EPYC with AVX512-BF16, channels-last tensors in both).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from meddpm.backends.openvino_denoiser import native_bf16
from meddpm.imaging.demo_heads import HEAD_SOURCES, head_source
from meddpm.imaging.geometry import ModelGrid
from meddpm.model.checkpoint import load_checkpoint, read_unet_tensors, save_meddpm_checkpoint
from meddpm.model.presets import ConditionScale, Preset, get_preset
from meddpm.model.unet import ConditionalDenoiser, build_unet

log = logging.getLogger("train_demo")
INPUT_CONV = "input_blocks.0.0"  # the UNet's first convolution: image and condition channels in


class HeadBatches(torch.utils.data.IterableDataset):
    """(images, conditions) on the network grid, as the app would feed them; step s's batch from seed [seed, s].

    With `echo` e > 1, e consecutive steps share one draw of heads (data echoing: the heads cost about as much CPU
    as the step at 64^3), each echo mirrored left-right from the one before; noise and timesteps still differ."""

    def __init__(
        self, preset: Preset, batch: int, seed: int, echo: int, whole_head_share: float, steps: tuple[int, int]
    ) -> None:
        self.preset, self.batch, self.seed, self.echo = preset, batch, seed, echo
        self.whole_head_share = whole_head_share
        first_step, last_step = steps
        self.steps = range(first_step, last_step + 1)
        affine = np.diag([*preset.image.voxel_size_mm, 1.0])
        self.grid = ModelGrid(preset.image.mask_shape, affine, preset)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        drawn: tuple[int, list[tuple[np.ndarray, np.ndarray]]] = (0, [])
        for step in self.steps:
            draw_step = (step - 1) // self.echo * self.echo + 1
            if drawn[0] != draw_step:
                drawn = (draw_step, self._draw(draw_step))
            mirror = (step - draw_step) % 2 == 1
            pairs = [(mask[::-1], image[::-1]) if mirror else (mask, image) for mask, image in drawn[1]]
            images = np.stack([self.grid.network_axes(image)[None] for _, image in pairs])
            conditions = np.stack([self.grid.condition(mask) for mask, _ in pairs])
            yield torch.from_numpy(images.copy()), torch.from_numpy(conditions)

    def _draw(self, step: int) -> list[tuple[np.ndarray, np.ndarray]]:
        source = head_source(self.preset.name)
        rng = np.random.default_rng([self.seed, step])
        pairs = []
        for _ in range(self.batch):
            mask, image = source.make(rng, self.preset.image.mask_shape, self.preset.image.voxel_size_mm[0])
            if self.whole_head_share and source.whole_head and rng.random() < self.whole_head_share:
                mask = source.whole_head(mask)
            if rng.random() < 0.5:  # left-right mirror: heads are near-symmetric
                mask, image = mask[::-1], image[::-1]
            pairs.append((mask, image))
        return pairs


def train(args: argparse.Namespace) -> None:
    preset = get_preset(args.preset)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda" or native_bf16()
    state_path = args.out.with_name(args.out.name + ".state.pt")
    resuming = state_path.exists()  # the state holds the weights: --init is read only by a new run
    unet = (_initial_unet(args.init, preset) if args.init and not resuming else build_unet(preset)).to(device)
    unet = unet.to(memory_format=torch.channels_last_3d)
    ema = copy.deepcopy(unet).eval()
    optimiser = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    done = _resume(state_path, args, unet, ema, optimiser, schedule) if resuming else 0
    model = ConditionalDenoiser(unet)
    noise_schedule = DDPMScheduler(
        num_train_timesteps=preset.schedule.timesteps, beta_schedule=preset.schedule.beta_schedule
    )
    batches = torch.utils.data.DataLoader(
        HeadBatches(
            preset,
            args.batch,
            args.seed,
            args.echo,
            args.whole_head_share,
            (done + 1, min(args.until or args.steps, args.steps)),
        ),
        batch_size=None,
        num_workers=1,  # draws the next batch while this one trains
    )
    log.info(
        "%s: steps %d..%d, batch %d, %s, BF16 autocast %s", preset.name, done + 1, args.steps, args.batch, device, bf16
    )
    started, losses = time.monotonic(), []
    for step, (images, conditions) in enumerate(batches, start=done + 1):
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        noise = torch.randn(images.shape, generator=generator)
        t = torch.randint(0, preset.schedule.timesteps, (args.batch,), generator=generator)
        input_noise = noise  # what the input is noised with; the target stays `noise`
        if args.input_perturbation:
            input_noise = noise + args.input_perturbation * torch.randn(images.shape, generator=generator)
        noisy = noise_schedule.add_noise(images, input_noise, t)
        noisy, conditions, noise = (
            x.to(device).contiguous(memory_format=torch.channels_last_3d) for x in (noisy, conditions, noise)
        )
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            prediction = model(noisy, conditions, t.float().to(device))
        errors = (prediction.float() - noise).square().mean(dim=(1, 2, 3, 4))
        if args.min_snr_gamma:  # Min-SNR weighting (Hang et al., ICCV 2023), for epsilon prediction
            snr = compute_snr(noise_schedule, t).to(device)
            errors = errors * snr.clamp(max=args.min_snr_gamma) / snr
        loss = errors.mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1.0 - args.ema_decay)
        if step % 25 == 0 or step == args.steps:
            seconds = (time.monotonic() - started) / (step - done)
            log.info("step %d/%d mean loss %.4f (%.2f s/step)", step, args.steps, np.mean(losses[-25:]), seconds)
        if step % args.save_every == 0 or step in (args.steps, args.until):
            save_meddpm_checkpoint(args.out, ema, preset, step)
            _save_state(state_path, args, step, unet, ema, optimiser, schedule)
            log.info("saved %s at step %d", args.out, step)


def _initial_unet(path: Path, preset: Preset) -> torch.nn.Module:
    """The weights of checkpoint `path` (Med-DDPM's `ema` layout). A checkpoint from before the preset's masks gained
    finer labels (fewer condition channels: a model of Med-DDPM's whole-head convention) serves too: each finer
    label's input channel starts as a copy of the one of the label it refines (`HeadSource.whole_head`), and the
    bias takes up the -1/+1 coding's offset, so that on the finer masks the run starts where the old model was."""
    tensors = read_unet_tensors(path)
    weight_name = f"{INPUT_CONV}.weight"
    image_channels, labels = preset.out_channels, list(preset.condition.labels)
    old_labels = labels[: tensors[weight_name].shape[1] - image_channels]
    if len(old_labels) == len(labels):
        return load_checkpoint(path, preset).unet
    refines = head_source(preset.name).whole_head
    coarse = [int(label) for label in refines(np.asarray(labels))] if refines else []
    if not coarse or not set(coarse) <= set(old_labels) or preset.condition.scale != ConditionScale.SYMMETRIC:
        raise SystemExit(
            f"{path}: its condition has {len(old_labels)} labels and preset {preset.name} has {len(labels)}, which "
            f"do not refine them; start from a checkpoint of this preset, or without --init"
        )
    weight, bias = tensors[weight_name], tensors[f"{INPUT_CONV}.bias"]
    channel = {label: weight[:, image_channels + old_labels.index(label)] for label in old_labels}
    tensors[weight_name] = torch.cat([weight[:, :image_channels], *(channel[c][:, None] for c in coarse)], dim=1)
    # An old channel read 2 * (sum of its labels' one-hots) - 1; the refined channels' sum reads that minus
    # (labels it became - 1).
    tensors[f"{INPUT_CONV}.bias"] = bias + sum(
        (coarse.count(c) - 1) * channel[c].sum(dim=(1, 2, 3)) for c in set(coarse)
    )
    unet = build_unet(preset)
    unet.load_state_dict(tensors)
    log.info("%s: condition labels %s refined to %s", path, old_labels, labels)
    return unet


def _save_state(path: Path, args: argparse.Namespace, step: int, *parts: object) -> None:
    """Everything a resumed run needs, written whole (temporary file, then rename)."""
    unet, ema, optimiser, schedule = parts
    state = {
        "step": step,
        "run": _run_settings(args),
        "unet": unet.state_dict(),
        "ema": ema.state_dict(),
        "optimiser": optimiser.state_dict(),
        "schedule": schedule.state_dict(),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _run_settings(args: argparse.Namespace) -> dict:
    """What a resumed run must share with the run it resumes."""
    names = (
        "preset",
        "steps",
        "batch",
        "seed",
        "lr",
        "echo",
        "min_snr_gamma",
        "input_perturbation",
        "whole_head_share",
    )
    return {name: getattr(args, name) for name in names}


def _resume(path: Path, args: argparse.Namespace, *parts: object) -> int:
    """Load the state of an interrupted run of the same settings; the step it had reached."""
    unet, ema, optimiser, schedule = parts
    state = torch.load(path, map_location="cpu", weights_only=True)
    run = _run_settings(args)
    if state["run"] != run:
        raise SystemExit(
            f"{path}: holds a run with settings {state['run']}, not {run}; resume with those settings, or move the "
            f"state file away to start afresh (--init {args.out} starts a new run from the saved weights)"
        )
    unet.load_state_dict(state["unet"])
    ema.load_state_dict(state["ema"])
    optimiser.load_state_dict(state["optimiser"])
    schedule.load_state_dict(state["schedule"])
    log.info("resuming %s at step %d", path, state["step"])
    return int(state["step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(HEAD_SOURCES), default="mni152-demo")
    parser.add_argument("--steps", type=int, default=6000, help="length of the run (its learning-rate schedule)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--init", type=Path, help="start a new run from this checkpoint's weights (Med-DDPM layout)")
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--echo", type=int, default=1, help="consecutive steps that share one draw of heads")
    parser.add_argument(
        "--min-snr-gamma", type=float, default=0.0, help="weigh each step's loss by min(SNR, gamma) / SNR (0: off)"
    )
    parser.add_argument(
        "--input-perturbation", type=float, default=0.0, help="extra noise in the model's input, not its target"
    )
    parser.add_argument(
        "--whole-head-share",
        type=float,
        default=0.0,
        help="share of masks shown in Med-DDPM's whole-head convention, where the heads have finer labels",
    )
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--until", type=int, help="stop after this step (saved); the same command resumes the run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)  # the initial weights
    args.out.parent.mkdir(parents=True, exist_ok=True)
    train(args)


if __name__ == "__main__":
    main()
