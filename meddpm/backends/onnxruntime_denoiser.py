"""The exported graph in process, with ONNX Runtime: what `--backend auto` runs on a GPU (CUDA); on a CPU it runs
OpenVINO (meddpm.backends.in_process)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from meddpm.errors import ModelError
from meddpm.model.tensors import CONDITION, NOISY_IMAGE, PREDICTED_NOISE, TIMESTEP
from meddpm.sampling.denoiser import Denoiser, NoisePredictor

log = logging.getLogger(__name__)


class OnnxRuntimeDenoiser(Denoiser):
    """CUDA is asked for only when a CUDA device is present.

    Within `conditioned`, the condition is bound once (on the GPU it stays resident there) and each step's noise
    is written by ONNX Runtime straight into a fresh array the caller owns (on the CPU; from the GPU, one copy).
    """

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, threads: int = 0):
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

    @contextlib.contextmanager
    def conditioned(self, condition: np.ndarray) -> Iterator[NoisePredictor]:
        binding = self.session.io_binding()
        resident = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(condition, dtype=np.float32), self.device)
        binding.bind_ortvalue_input(CONDITION, resident)

        def predict_noise(noisy_image: np.ndarray, timestep: np.ndarray) -> np.ndarray:
            binding.bind_cpu_input(NOISY_IMAGE, np.ascontiguousarray(noisy_image, dtype=np.float32))
            binding.bind_cpu_input(TIMESTEP, np.ascontiguousarray(timestep, dtype=np.float32))
            if self.device == "cuda":
                binding.bind_output(PREDICTED_NOISE, "cuda")
                self.session.run_with_iobinding(binding)
                return binding.copy_outputs_to_cpu()[0]
            noise = np.empty(noisy_image.shape, dtype=np.float32)
            binding.bind_output(PREDICTED_NOISE, "cpu", 0, np.float32, noise.shape, noise.ctypes.data)
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
