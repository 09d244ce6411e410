"""BF16 on any CPU, emulated: what a CPU with native BF16 (AMX, AVX512-BF16) computes, measurable on one without.

The exported graph is rewritten so that every FP32 operand of every operator is rounded to BF16 (Cast to bfloat16
and back, round to nearest even) and everything runs in FP32 in ONNX Runtime: native BF16 kernels multiply BF16
operands with FP32 accumulation, and OpenVINO keeps the activations between layers in BF16 too. Normalisation and
softmax keep FP32 inputs, as OpenVINO computes their statistics in FP32. Rounding only the operands of convolutions
and matrix products gave 60% of native BF16's per-call error on the demo model (3.2e-3 against 5.4e-3); rounding
all operands gave the same (5.3-5.7e-3 against 5.3-5.6e-3; benchmarks/precision_gate.py prints it per run).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from meddpm.backends.onnxruntime_denoiser import OnnxRuntimeDenoiser
from meddpm.backends.options import step_precision
from meddpm.model.presets import Precision
from meddpm.sampling.denoiser import Denoiser, NoisePredictor

FP32_OPERATORS = {"InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax"}


def bf16_rounded_graph(onnx_path: Path, out_path: Path) -> Path:
    """A copy of the graph whose operators take BF16-rounded operands (their FP32 ones; FP32_OPERATORS aside)."""
    model = onnx.load(str(onnx_path))
    floats = _float_tensors(model)
    nodes, rounded = [], {}  # rounded: tensor name -> the name of its BF16-rounded copy
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if node.op_type in FP32_OPERATORS or name not in floats:
                continue
            if name not in rounded:
                rounded[name] = f"{name}__bf16"
                nodes.append(helper.make_node("Cast", [name], [f"{name}__to_bf16"], to=TensorProto.BFLOAT16))
                nodes.append(helper.make_node("Cast", [f"{name}__to_bf16"], [rounded[name]], to=TensorProto.FLOAT))
            node.input[index] = rounded[name]
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return out_path


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the graph's FP32 tensors: inputs, weights and intermediate values (by shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model).graph
    typed = [*inferred.input, *inferred.value_info, *inferred.output]
    floats = {v.name for v in typed if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    return floats | {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}


class EmulatedBf16Denoiser(Denoiser):
    """ONNX Runtime on the BF16-rounded graph for bf16, on the original for fp32, both for mixed (by timestep, as
    OpenVINO's mixed precision does)."""

    def __init__(self, onnx_path: Path, precision: Precision, timesteps: int, work: Path):
        self.precision, self.timesteps = precision, timesteps
        self.name = f"emulated ({precision})"
        self.runtimes = {}
        if precision in (Precision.FP32, Precision.MIXED):
            self.runtimes[Precision.FP32] = OnnxRuntimeDenoiser(onnx_path)
        if precision in (Precision.BF16, Precision.MIXED):
            rounded = bf16_rounded_graph(onnx_path, work / f"{onnx_path.stem}.bf16-rounded.onnx")
            self.runtimes[Precision.BF16] = OnnxRuntimeDenoiser(rounded)

    @contextlib.contextmanager
    def conditioned(self, condition: np.ndarray) -> Iterator[NoisePredictor]:
        with contextlib.ExitStack() as stack:
            bound = {p: stack.enter_context(d.conditioned(condition)) for p, d in self.runtimes.items()}

            def predict_noise(noisy_image: np.ndarray, timestep: np.ndarray) -> np.ndarray:
                return bound[step_precision(self.precision, float(timestep[0]), self.timesteps)](noisy_image, timestep)

            yield predict_noise
