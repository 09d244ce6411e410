"""Which runtime runs the UNet in process, and at what precision; importable without the runtimes."""

from __future__ import annotations

from enum import StrEnum


class Backend(StrEnum):
    AUTO = "auto"  # ONNX Runtime with CUDA where a GPU is present, else OpenVINO where installed, else ONNX Runtime
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"


class Precision(StrEnum):
    AUTO = "auto"  # fp32: a reduced precision is chosen only once its quality gate has passed (docs/performance.md)
    FP32 = "fp32"
    BF16 = "bf16"  # OpenVINO, on a CPU with native BF16 (AMX or AVX512-BF16)
    MIXED = "mixed"  # fp32 at high noise (t >= MIXED_FP32_FROM of the schedule), where errors are amplified; bf16 below


# x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) multiplies eps's error by up to ~5000 at the highest noise; BF16's ~5e-3
# relative error there cost 0.02 Dice on the demo model, FP32 above t = 200 of 250 brought it within 0.002.
MIXED_FP32_FROM = 0.8
