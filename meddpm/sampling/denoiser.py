"""One denoiser interface, whatever runs the UNet (meddpm.backends: OpenVINO or ONNX Runtime in process, PyTorch,
Triton; BLS inside Triton).

A denoiser predicts the noise in a batch of noisy images. The condition is fixed for a whole sampling run, so the
loop binds it once (`with denoiser.conditioned(condition) as predict_noise:`) and then calls
`predict_noise(noisy_image, timestep)` every step; a remote backend can keep the condition resident.
Arrays are float32 numpy: noisy_image (B, C, D, H, W), timestep (B,), condition (B, L, D, H, W); the predicted
noise is a new array the caller owns (the loop works on it in place). `close()` releases what the backend holds
(sessions, connections); a denoiser is also a context manager that closes it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np

NoisePredictor = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (noisy_image, timestep) -> predicted noise


class Denoiser(abc.ABC):
    """Predicts epsilon for (noisy_image, timestep) under a bound condition."""

    name: str = "denoiser"
    in_process: bool = True  # the UNet runs in this process (its memory counts in this process's estimate)
    runtime: str = "onnxruntime"  # in process: whose calibration of the memory estimate applies (imaging.memory)

    @abc.abstractmethod
    def conditioned(self, condition: np.ndarray) -> AbstractContextManager[NoisePredictor]:
        """Bind a condition for the steps of one sampling run."""

    def predict(self, noisy_image: np.ndarray, timestep: np.ndarray, condition: np.ndarray) -> np.ndarray:
        """One call: predicted noise, same shape as noisy_image."""
        with self.conditioned(condition) as predict_noise:
            return predict_noise(noisy_image, timestep)

    def close(self) -> None:  # noqa: B027 (a backend that holds nothing need not override it)
        """Release what the backend holds; nothing by default."""

    def __enter__(self) -> Denoiser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
