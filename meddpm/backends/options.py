"""Which runtime runs the UNet in process, and at what precision (meddpm.model.presets.Precision) each call;
importable without the runtimes."""

from __future__ import annotations

from enum import StrEnum

from meddpm.model.presets import Precision


class Backend(StrEnum):
    AUTO = "auto"  # ONNX Runtime with CUDA where a GPU is present, else OpenVINO where installed, else ONNX Runtime
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"


# x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) multiplies eps's error by up to ~5000 at the highest noise; BF16's ~5e-3
# relative error there cost 0.02 Dice on the demo model, FP32 above t = 200 of 250 brought it within 0.002.
MIXED_FP32_FROM = 0.8


def step_precision(precision: Precision, timestep: float, timesteps: int) -> Precision:
    """The precision one UNet call runs at: mixed is fp32 at t >= MIXED_FP32_FROM * timesteps and bf16 below."""
    if precision != Precision.MIXED:
        return precision
    return Precision.FP32 if timestep >= MIXED_FP32_FROM * timesteps else Precision.BF16
