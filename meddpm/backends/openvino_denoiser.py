"""The exported graph in process with OpenVINO's CPU runtime: FP32, BF16 on CPUs with native BF16, or mixed.

The graph is compiled once per input shape (the batch of a run) and precision, the condition bound once per volume.
Mixed precision runs the steps at high noise in FP32 and the rest in BF16 (meddpm.backends.options.step_precision).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from meddpm.backends.options import step_precision
from meddpm.errors import ConfigurationError, ModelError
from meddpm.model.presets import Precision
from meddpm.model.tensors import CONDITION, NOISY_IMAGE, PREDICTED_NOISE, TIMESTEP
from meddpm.sampling.denoiser import Denoiser, NoisePredictor

log = logging.getLogger(__name__)
HINTS = {Precision.FP32: "f32", Precision.BF16: "bf16"}


def native_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes in BF16 here (AMX or AVX512-BF16)."""
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoDenoiser(Denoiser):
    def __init__(self, onnx_path: Path, precision: Precision, timesteps: int, threads: int = 0):
        self.core = ov.Core()
        capabilities = self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if precision in (Precision.BF16, Precision.MIXED) and "BF16" not in capabilities:
            raise ConfigurationError(
                f"--precision {precision} needs a CPU with native BF16 (AMX or AVX512-BF16), and this one has none "
                f"(OpenVINO's CPU capabilities: {', '.join(capabilities)}); use --precision fp32"
            )
        try:
            self.graph = self.core.read_model(str(onnx_path))
        except RuntimeError as error:
            raise ModelError(
                f"{onnx_path}: OpenVINO cannot read the model ({error}); re-run `python -m export`"
            ) from None
        self.precision, self.timesteps = precision, timesteps
        self.threads = threads
        self.compiled: dict[tuple[Any, ...], Any] = {}
        self.name = f"openvino ({precision})"
        # the memory estimate's calibration (meddpm.imaging.memory): BF16 and mixed hold other compiled graphs
        self.runtime = "openvino" if precision in (Precision.FP32, Precision.AUTO) else f"openvino-{precision}"
        log.info("OpenVINO %s on the CPU, %s", ov.get_version(), precision)

    def _compiled(self, condition_shape: tuple[int, ...], precision: Precision) -> Any:
        """The graph compiled for this condition's shape (batch and grid) at `precision`, once."""
        key = (condition_shape, precision)
        if key not in self.compiled:
            started = time.monotonic()
            graph = self.graph.clone()
            batch, _, *grid = condition_shape
            channels = self.graph.input(NOISY_IMAGE).get_partial_shape()[1].get_length()
            graph.reshape({NOISY_IMAGE: [batch, channels, *grid], CONDITION: list(condition_shape), TIMESTEP: [batch]})
            config: dict[str, str | int] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": HINTS[precision]}
            if self.threads:
                config["INFERENCE_NUM_THREADS"] = self.threads
            self.compiled[key] = self.core.compile_model(graph, "CPU", config)
            log.info(
                "OpenVINO: compiled for %s at %s in %.1f s", condition_shape, precision, time.monotonic() - started
            )
        return self.compiled[key]

    @contextlib.contextmanager
    def conditioned(self, condition: np.ndarray) -> Iterator[NoisePredictor]:
        condition = np.ascontiguousarray(condition, dtype=np.float32)
        precisions = [Precision.FP32, Precision.BF16] if self.precision == Precision.MIXED else [self.precision]
        requests = {}
        for precision in precisions:
            request = self._compiled(condition.shape, precision).create_infer_request()
            request.set_tensor(CONDITION, ov.Tensor(condition))  # a copy, once a volume (the array may be read-only)
            requests[precision] = request

        def predict_noise(noisy_image: np.ndarray, timestep: np.ndarray) -> np.ndarray:
            request = requests[step_precision(self.precision, float(timestep[0]), self.timesteps)]
            request.set_tensor(NOISY_IMAGE, ov.Tensor(np.ascontiguousarray(noisy_image, dtype=np.float32)))
            request.set_tensor(TIMESTEP, ov.Tensor(np.ascontiguousarray(timestep, dtype=np.float32)))
            request.infer()
            return request.get_tensor(PREDICTED_NOISE).data.copy()

        yield predict_noise
