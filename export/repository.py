"""Write a Triton model repository entry: config.pbtxt, version 1 with the graph, and a manifest.

For a model NAME the repository gets:
- NAME/      the ONNX Runtime backend config (GPU instances by default; optional TensorRT accelerator);
- NAME_openvino/  the same graph on Triton's OpenVINO backend, for CPU servers running the stock container
             (whose python has neither OpenVINO nor ONNX Runtime); one sample a call (OPENVINO_MAX_BATCH_SIZE);
- NAME_cpu/  the same graph served by the python backend with OpenVINO (else ONNX Runtime), for Triton servers
             with neither backend (the nvidia-pytriton `tritonserver`), under the same tensor names;
- NAME_trt/  a TensorRT plan, only when asked for and TensorRT is installed;
- NAME_sampler/  the whole sampling loop (python backend, decoupled), calling any UNet entry through BLS;
             its version folder holds a copy of the sampling core (the files meddpm.sampling.sampler_files
             lists), so the server runs the app's own loop and nothing else of the package.
Each version folder holds `manifest.json`: the preset, the source checkpoint's hash, the hashes of the graph and
of the sampler's `meddpm` copy, package versions and the verification figures, so that a client knows exactly
what it serves. Each config.pbtxt records the hash of what its entry runs (ONNX_SHA256, PACKAGE_SHA256), for a
client to compare with its manifest and for the python-backend entries to check their files against at load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
from importlib import metadata
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

import meddpm
from meddpm.errors import ConfigurationError
from meddpm.model.manifest import MANIFEST, ONNX_SHA256, PACKAGE_SHA256, SAMPLER_PACKAGE, Manifest
from meddpm.model.presets import Preset
from meddpm.model.served_model import VARIANT_SUFFIXES, Entry
from meddpm.model.tensors import CONDITION, PREDICTED_NOISE, TIMESTEP, sample_shapes
from meddpm.output_folders import staged_folder, write_text
from meddpm.sampling import protocol, sampler_files

PYTHON_MODEL_SOURCE = Path(__file__).with_name("triton_python_model.py")
SAMPLER_MODEL_SOURCE = Path(__file__).with_name("triton_sampler_model.py")
SAMPLER_CORE_FILES = {f"{SAMPLER_PACKAGE}/{name}": sampler_files.PACKAGE / name for name in sampler_files.FILES}
SAMPLER_INSTANCES = 2
# Triton's OpenVINO backend refuses a batch smaller than max_batch_size unless it pads it (ENABLE_BATCH_PADDING),
# computing the padding too: one sample a call wastes nothing, and a CPU gains little from batching anyway.
OPENVINO_MAX_BATCH_SIZE = 1
# What the OpenVINO backend is asked for: the latency of one call, one stream (as the app's in-process OpenVINO).
OPENVINO_PARAMETERS = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
VERSIONS_RECORDED = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "diffusers")
MODEL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def check_model_name(name: str) -> None:
    """A model name must be one plain folder name of the repository, not a variant's."""
    if not MODEL_NAME.fullmatch(name) or name.endswith(VARIANT_SUFFIXES):
        raise ConfigurationError(
            f"model name '{name}' is not a plain model name; use ASCII letters, digits, '_', '-' and '.' (not first), "
            f"no path separators, and no ending in {', '.join(VARIANT_SUFFIXES)} (the export adds those): "
            f"e.g. --name meddpm_whole_head"
        )


def model_config(
    name: str, preset: Preset, entry: Entry, max_batch_size: int, onnx_sha256: str, tensorrt_accelerator: bool = False
) -> mc.ModelConfig:
    """The config of one UNet entry: the graph (UNET), the graph on the OpenVINO backend (OPENVINO) or on the python
    backend (CPU), or the TensorRT plan built from the graph whose hash is `onnx_sha256` (TRT)."""
    config = mc.ModelConfig(name=name, max_batch_size=max_batch_size)
    if entry == Entry.UNET:
        config.platform = "onnxruntime_onnx"
    elif entry == Entry.OPENVINO:
        config.backend = "openvino"
        config.default_model_filename = "model.onnx"
        config.max_batch_size = OPENVINO_MAX_BATCH_SIZE
        for key, value in OPENVINO_PARAMETERS.items():
            config.parameters[key].string_value = value
    elif entry == Entry.CPU:
        config.backend = "python"
    elif entry == Entry.TRT:
        config.platform = "tensorrt_plan"
    else:
        raise ValueError(f"{entry!r} is not a UNet entry")
    shapes = sample_shapes(preset)
    for tensor_name in (name for name in shapes if name != PREDICTED_NOISE):
        tensor = config.input.add(name=tensor_name, data_type=mc.TYPE_FP32, dims=shapes[tensor_name])
        if tensor_name == TIMESTEP:  # the graph's timestep is (batch,): Triton's [1] reshaped to []
            tensor.reshape.SetInParent()
    config.output.add(name=PREDICTED_NOISE, data_type=mc.TYPE_FP32, dims=shapes[PREDICTED_NOISE])
    if config.max_batch_size > 1:
        config.dynamic_batching.max_queue_delay_microseconds = 100
    on_cpu = entry in (Entry.OPENVINO, Entry.CPU)
    config.instance_group.add(
        count=1, kind=mc.ModelInstanceGroup.KIND_CPU if on_cpu else mc.ModelInstanceGroup.KIND_GPU
    )
    if entry == Entry.CPU:
        config.parameters["onnx_file"].string_value = "model.onnx"
    config.parameters[ONNX_SHA256].string_value = onnx_sha256
    if tensorrt_accelerator:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters["precision_mode"] = "FP16"
        accelerator.parameters["max_workspace_size_bytes"] = str(8 << 30)
        accelerator.parameters["trt_engine_cache_enable"] = "1"
    return config


def sampler_config(name: str, preset: Preset, unet_models: dict[str, int], package_sha256: str) -> mc.ModelConfig:
    """The server-side loop: one condition in, progress per step and the volumes out (decoupled)."""
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    shapes = sample_shapes(preset)
    config.input.add(name=CONDITION, data_type=mc.TYPE_FP32, dims=shapes[CONDITION])
    config.output.add(name=protocol.PROGRESS, data_type=mc.TYPE_INT32, dims=[2])
    config.output.add(name=protocol.IMAGE, data_type=mc.TYPE_FP32, dims=[-1, *shapes[PREDICTED_NOISE]])
    config.model_transaction_policy.decoupled = True
    # Each instance runs one loop at a time; the UNet's dynamic batcher merges the steps of concurrent loops.
    config.instance_group.add(count=SAMPLER_INSTANCES, kind=mc.ModelInstanceGroup.KIND_CPU)
    # the UNet entries it may call, each with its max batch size: "NAME:4,NAME_openvino:1,..."
    config.parameters["unet_models"].string_value = ",".join(f"{m}:{batch}" for m, batch in unet_models.items())
    config.parameters[PACKAGE_SHA256].string_value = package_sha256
    return config


def config_text(config: mc.ModelConfig) -> str:
    return (
        "# Written by `python -m export`; edit the export options rather than this file.\n"
        + text_format.MessageToString(config)
    )


def package_versions() -> dict[str, str]:
    versions = {"meddpm-deploy": meddpm.__version__}
    for package in VERSIONS_RECORDED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_entry(
    repository: Path, name: str, config: mc.ModelConfig, files: dict[str, Path], manifest: Manifest
) -> Path:
    """Write NAME/config.pbtxt and NAME/1/{files, manifest.json}; version 1 is replaced atomically."""
    entry = repository / name
    with staged_folder(entry / "1") as staging:
        for target, source in files.items():
            _link_or_copy(source, staging / target)
        dataclasses.replace(manifest, triton_model=name).write(staging / MANIFEST)
        (staging / ".gitkeep").touch()
    write_text(entry / "config.pbtxt", config_text(config))
    return entry


def _link_or_copy(source: Path, target: Path) -> None:
    """Weights are hard-linked where the file system allows (they are large, and replaced whole, never edited);
    code is copied, so that an edit of the source after export cannot change what an entry runs."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.suffix in (".onnx", ".plan"):
        with contextlib.suppress(OSError):
            os.link(source, target)
            return
    shutil.copyfile(source, target)
