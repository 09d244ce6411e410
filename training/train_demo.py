"""Train the demo model on procedural head phantoms and save it in Med-DDPM's checkpoint layout.

    python -m training.train_demo --steps 3000 --batch 4 --out models/demo/model_demo.pt

The network is the "demo" preset of meddpm/model/presets.toml (Med-DDPM architecture, 16 channels, 32^3 grid).
Training is Med-DDPM's objective: epsilon prediction with a uniformly drawn timestep, mean squared error,
on the preset's cosine schedule; weights are an exponential moving average, as Med-DDPM samples with.
Fits a 2-core CPU: about 1.3 s a step at batch 4, 65 minutes in all; a GPU is used when present.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from meddpm.imaging.geometry import ModelGrid
from meddpm.imaging.phantom_heads import make_phantom
from meddpm.model.checkpoint import load_checkpoint, save_meddpm_checkpoint
from meddpm.model.presets import get_preset
from meddpm.model.unet import ConditionalDenoiser, build_unet

log = logging.getLogger("train_demo")


def phantom_batch(rng: np.random.Generator, grid: ModelGrid, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, conditions) on the network grid, as the app would feed them."""
    preset = grid.preset
    images, conditions = [], []
    for _ in range(batch):
        mask, image = make_phantom(rng, preset.image.mask_shape, preset.image.voxel_size_mm[0])
        if rng.random() < 0.5:  # left-right mirror: heads are near-symmetric
            mask, image = mask[::-1], image[::-1]
        images.append(grid.network_axes(image)[None])
        conditions.append(grid.condition(mask))
    return torch.from_numpy(np.stack(images).copy()), torch.from_numpy(np.stack(conditions))


def train(steps: int, batch: int, lr: float, seed: int, out: Path, init: Path | None, ema_decay: float) -> None:
    preset = get_preset("demo")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    affine = np.diag([*preset.image.voxel_size_mm, 1.0])
    grid = ModelGrid(preset.image.mask_shape, affine, preset)

    unet = (load_checkpoint(init, preset).unet if init else build_unet(preset)).to(device)
    ema = copy.deepcopy(unet).eval()
    model = ConditionalDenoiser(unet)
    noise_schedule = DDPMScheduler(
        num_train_timesteps=preset.schedule.timesteps, beta_schedule=preset.schedule.beta_schedule
    )
    optimiser = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.05)

    started = time.monotonic()
    for step in range(1, steps + 1):
        images, conditions = (t.to(device) for t in phantom_batch(rng, grid, batch))
        noise = torch.randn_like(images)
        t = torch.randint(0, preset.schedule.timesteps, (batch,), device=device)
        noisy = noise_schedule.add_noise(images, noise, t.cpu()).to(device)
        loss = torch.nn.functional.mse_loss(model(noisy, conditions, t.float()), noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimiser.step()
        scheduler.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1.0 - ema_decay)
        if step % 100 == 0 or step == steps:
            elapsed = time.monotonic() - started
            log.info("step %d/%d loss %.4f (%.2f s/step)", step, steps, loss.item(), elapsed / step)
        if step % 1000 == 0 or step == steps:
            save_meddpm_checkpoint(out, ema.cpu(), preset, step)
            ema.to(device)
    log.info("saved %s", out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("models/demo/model_demo.pt"))
    parser.add_argument("--init", type=Path, help="continue from this checkpoint's weights (Med-DDPM layout)")
    parser.add_argument("--ema-decay", type=float, default=0.995)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    train(args.steps, args.batch, args.lr, args.seed, args.out, args.init, args.ema_decay)


if __name__ == "__main__":
    main()
