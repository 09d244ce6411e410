"""The denoiser that runs the exported graph in this process: the runtime and precision `auto` stands for here."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from meddpm.backends.options import Backend
from meddpm.errors import ConfigurationError
from meddpm.model.presets import Precision, Preset
from meddpm.sampling.denoiser import Denoiser

log = logging.getLogger(__name__)


def in_process_denoiser(
    onnx_path: Path, preset: Preset, backend: Backend, precision: Precision, threads: int = 0
) -> Denoiser:
    """ONNX Runtime with CUDA where a GPU is present; on a CPU, OpenVINO (1.34-1.47x faster than ONNX Runtime in FP32
    on an AVX2 CPU, docs/performance.md) where installed. `auto` precision is the preset's gated precision (the
    cheapest that passed the quality gate on its weights) where OpenVINO runs on a CPU with native BF16, else FP32."""
    from meddpm.backends.onnxruntime_denoiser import OnnxRuntimeDenoiser, cuda_present

    if backend == Backend.AUTO:
        gpu, openvino = cuda_present(), importlib.util.find_spec("openvino") is not None
        backend = Backend.OPENVINO if openvino and not gpu else Backend.ONNXRUNTIME
        log.info("backend auto: %s (%s)", backend, "a CUDA device" if gpu else "CPU" if openvino else "no OpenVINO")
    if precision == Precision.AUTO:
        precision = _auto_precision(preset, backend)
    if backend == Backend.ONNXRUNTIME:
        if precision != Precision.FP32:
            raise ConfigurationError(
                f"--precision {precision}: ONNX Runtime runs the exported graph in FP32 only; use --backend openvino "
                f"(a CPU with native BF16), or --precision fp32"
            )
        return OnnxRuntimeDenoiser(onnx_path, threads)
    from meddpm.backends.openvino_denoiser import OpenVinoDenoiser

    return OpenVinoDenoiser(onnx_path, precision, preset.schedule.timesteps, threads)


def _auto_precision(preset: Preset, backend: Backend) -> Precision:
    if preset.gated_precision == Precision.FP32 or backend != Backend.OPENVINO:
        return Precision.FP32
    from meddpm.backends.openvino_denoiser import native_bf16

    if not native_bf16():
        log.info("precision auto: fp32 (this CPU has no native BF16 for the gated %s)", preset.gated_precision)
        return Precision.FP32
    log.info("precision auto: %s (passed the quality gate for preset %s)", preset.gated_precision, preset.name)
    return preset.gated_precision
