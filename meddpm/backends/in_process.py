"""The denoiser that runs the exported graph in this process: the runtime and precision `auto` stands for here."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from meddpm.backends.options import Backend, Precision
from meddpm.errors import ConfigurationError
from meddpm.sampling.denoiser import Denoiser

log = logging.getLogger(__name__)


def in_process_denoiser(onnx_path: Path, backend: Backend, precision: Precision, timesteps: int,
                        threads: int = 0) -> Denoiser:  # fmt: skip
    """ONNX Runtime with CUDA where a GPU is present; on a CPU, OpenVINO (1.34-1.47x faster than ONNX Runtime in FP32
    on an AVX2 CPU, docs/performance.md) where installed. `auto` precision is FP32: BF16 and mixed are chosen
    only by asking for them, until their quality gate has passed on hardware with native BF16."""
    from meddpm.backends.onnxruntime_denoiser import OnnxRuntimeDenoiser, cuda_present

    if backend == Backend.AUTO:
        gpu, openvino = cuda_present(), importlib.util.find_spec("openvino") is not None
        backend = Backend.OPENVINO if openvino and not gpu else Backend.ONNXRUNTIME
        log.info("backend auto: %s (%s)", backend, "a CUDA device" if gpu else "CPU" if openvino else "no OpenVINO")
    precision = Precision.FP32 if precision == Precision.AUTO else precision
    if backend == Backend.ONNXRUNTIME:
        if precision != Precision.FP32:
            raise ConfigurationError(
                f"--precision {precision}: ONNX Runtime runs the exported graph in FP32 only; use --backend openvino "
                f"(a CPU with native BF16), or --precision fp32"
            )
        return OnnxRuntimeDenoiser(onnx_path, threads)
    from meddpm.backends.openvino_denoiser import OpenVinoDenoiser

    return OpenVinoDenoiser(onnx_path, precision, timesteps, threads)
