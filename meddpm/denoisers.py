"""One denoiser interface, whatever runs the UNet: ONNX Runtime in process, PyTorch, or Triton (triton_denoiser).

A denoiser predicts the noise in a batch of noisy images. The condition is fixed for a whole sampling run,
so the loop binds it once (`with denoiser.conditioned(condition) as predict_noise:`) and then calls
`predict_noise(noisy_image, timestep)` every step; a remote backend can keep the condition resident.
Arrays are float32 numpy: noisy_image (B, C, D, H, W), timestep (B,), condition (B, L, D, H, W); the predicted
noise is a new array the caller owns (the loop works on it in place).
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from meddpm.errors import ModelError
from meddpm.unet import INPUT_NAMES, OUTPUT_NAME, ConditionalDenoiser

NoisePredictor = Callable[[np.ndarray, np.ndarray], np.ndarray]
log = logging.getLogger(__name__)


class Denoiser(abc.ABC):
    """Predicts epsilon for (noisy_image, timestep, condition)."""

    name: str = "denoiser"

    @abc.abstractmethod
    def predict(self, noisy_image: np.ndarray, timestep: np.ndarray, condition: np.ndarray) -> np.ndarray:
        """Predicted noise, same shape as noisy_image."""

    @contextlib.contextmanager
    def conditioned(self, condition: np.ndarray) -> Iterator[NoisePredictor]:
        """Bind a condition for the steps of one sampling run."""
        yield lambda noisy_image, timestep: self.predict(noisy_image, timestep, condition)


class OnnxRuntimeDenoiser(Denoiser):
    """The exported graph in process; CUDA is asked for only when a CUDA device is present.

    Within `conditioned`, the condition is bound once (on the GPU it stays resident there) and each step's noise
    is written by ONNX Runtime straight into a fresh array the caller owns (on the CPU; from the GPU, one copy).
    """

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if cuda_present() and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception as error:  # ONNX Runtime raises its own untyped errors
            raise ModelError(
                f"{onnx_path}: ONNX Runtime cannot load the model ({error}); re-run `python -m export`"
            ) from None
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        log.info("ONNX Runtime session on %s", ", ".join(self.session.get_providers()))

    def predict(self, noisy_image: np.ndarray, timestep: np.ndarray, condition: np.ndarray) -> np.ndarray:
        with self.conditioned(condition) as predict_noise:
            return predict_noise(noisy_image, timestep)

    @contextlib.contextmanager
    def conditioned(self, condition: np.ndarray) -> Iterator[NoisePredictor]:
        from onnxruntime import OrtValue

        binding = self.session.io_binding()
        resident = OrtValue.ortvalue_from_numpy(np.ascontiguousarray(condition, dtype=np.float32), self.device)
        binding.bind_ortvalue_input(INPUT_NAMES[1], resident)

        def predict_noise(noisy_image: np.ndarray, timestep: np.ndarray) -> np.ndarray:
            binding.bind_cpu_input(INPUT_NAMES[0], np.ascontiguousarray(noisy_image, dtype=np.float32))
            binding.bind_cpu_input(INPUT_NAMES[2], np.ascontiguousarray(timestep, dtype=np.float32))
            if self.device == "cuda":
                binding.bind_output(OUTPUT_NAME, "cuda")
                self.session.run_with_iobinding(binding)
                return binding.copy_outputs_to_cpu()[0]
            noise = np.empty(noisy_image.shape, dtype=np.float32)
            binding.bind_output(OUTPUT_NAME, "cpu", 0, np.float32, noise.shape, noise.ctypes.data)
            self.session.run_with_iobinding(binding)
            return noise

        yield predict_noise


def cuda_present() -> bool:
    """Whether a CUDA device is usable: asked of the driver, since torch may be a CPU build."""
    if torch.cuda.is_available():
        return True
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


class TorchDenoiser(Denoiser):
    """The PyTorch model itself: the reference the other backends are checked against."""

    name = "torch"

    def __init__(self, model: ConditionalDenoiser, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.device = device

    @torch.no_grad()
    def predict(self, noisy_image: np.ndarray, timestep: np.ndarray, condition: np.ndarray) -> np.ndarray:
        tensors = (torch.from_numpy(a).to(self.device) for a in (noisy_image, condition, timestep))
        return self.model(*tensors).cpu().numpy()
