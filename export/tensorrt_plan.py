"""Build a TensorRT plan from the exported graph: FP16 compute with every normalisation layer kept in FP32.

Needs the `tensorrt` Python package and an NVIDIA GPU (a plan is tied to the GPU model and TensorRT
version it was built with). The optimisation profile spans batch 1..max_batch_size at the preset's grid:
changing max_batch_size means rebuilding the plan.
"""

from __future__ import annotations

from pathlib import Path

from meddpm.errors import ConfigurationError
from meddpm.model.presets import Preset
from meddpm.model.tensors import CONDITION, NOISY_IMAGE, TIMESTEP, sample_shapes

WORKSPACE_BYTES = 8 << 30


def trtexec_command(onnx_path: Path, plan_path: Path, preset: Preset, max_batch_size: int) -> str:
    """The equivalent trtexec command, for building inside the stock Triton container instead."""

    def shapes(batch: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in graph_shapes(preset, batch).items())

    return (
        f"trtexec --onnx={onnx_path} --saveEngine={plan_path} --fp16 --precisionConstraints=obey "
        f"--layerPrecisions='*InstanceNormalization*:fp32' --minShapes={shapes(1)} "
        f"--optShapes={shapes(max_batch_size)} --maxShapes={shapes(max_batch_size)}"
    )


def graph_shapes(preset: Preset, batch: int) -> dict[str, tuple[int, ...]]:
    """The graph's input shapes for `batch` samples on the preset's grid (its timestep has no per-sample axis)."""
    shapes = sample_shapes(preset)
    return {NOISY_IMAGE: (batch, *shapes[NOISY_IMAGE]), CONDITION: (batch, *shapes[CONDITION]), TIMESTEP: (batch,)}


def build_plan(onnx_path: Path, plan_path: Path, preset: Preset, max_batch_size: int) -> None:
    try:
        import tensorrt as trt
    except ImportError:
        raise ConfigurationError(
            "--tensorrt-plan needs the 'tensorrt' Python package and an NVIDIA GPU, and this machine has no "
            "tensorrt. Build the plan where they are, e.g. inside the Triton container:\n  "
            + trtexec_command(onnx_path, plan_path, preset, max_batch_size)
        ) from None

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigurationError(f"TensorRT cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.precision = trt.float32
            for output in range(layer.num_outputs):
                layer.set_output_type(output, trt.float32)

    profile = builder.create_optimization_profile()
    smallest, largest = graph_shapes(preset, 1), graph_shapes(preset, max_batch_size)
    for name in smallest:
        profile.set_shape(name, smallest[name], largest[name], largest[name])
    config.add_optimization_profile(profile)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ConfigurationError(f"TensorRT could not build a plan from {onnx_path}; see the log above")
    plan_path.write_bytes(bytes(plan))
