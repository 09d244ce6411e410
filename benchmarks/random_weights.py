"""Released-size UNets with random weights, for benchmarks that need the architecture but not the training."""

from __future__ import annotations

import torch

from meddpm.model.presets import Preset
from meddpm.model.unet import MedDDPMUNet, build_unet


def random_unet(preset: Preset, seed: int = 0, scale: float = 0.02) -> MedDDPMUNet:
    """The preset's UNet with every parameter drawn from N(0, scale^2) (a fresh one outputs exactly zero)."""
    unet = build_unet(preset)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return unet
