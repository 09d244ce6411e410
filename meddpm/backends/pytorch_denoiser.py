"""The PyTorch model itself: the reference the other backends are checked against."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from meddpm.model.unet import ConditionalDenoiser
from meddpm.sampling.denoiser import Denoiser, NoisePredictor


class TorchDenoiser(Denoiser):
    name = "torch"

    def __init__(self, model: ConditionalDenoiser, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.device = device

    @contextlib.contextmanager
    def conditioned(self, condition: np.ndarray) -> Iterator[NoisePredictor]:
        bound = torch.tensor(condition, device=self.device)  # a copy: the loop's condition may be a read-only view

        @torch.no_grad()
        def predict_noise(noisy_image: np.ndarray, timestep: np.ndarray) -> np.ndarray:
            noisy, t = (torch.from_numpy(a).to(self.device) for a in (noisy_image, timestep))
            return self.model(noisy, bound, t).cpu().numpy()

        yield predict_noise
