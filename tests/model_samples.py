"""Model repositories damaged on purpose: a graph that computes NaN or breaks the tensor contract, an edited
manifest."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from meddpm.model.manifest import sha256_of
from meddpm.model.tensors import CONDITION, NOISY_IMAGE, PREDICTED_NOISE, TIMESTEP

MODEL = "meddpm_demo"


def volume(channels: int) -> list[int | str]:
    return ["batch", channels, "depth", "height", "width"]


def nan_graph(
    output: str = PREDICTED_NOISE, output_dims: list[int | str] | None = None, output_type: int = TensorProto.FLOAT
) -> onnx.ModelProto:
    """A valid graph with the demo model's inputs whose output is NaN (noisy_image * NaN); its output's name, shape
    and type as asked."""
    inputs = [
        helper.make_tensor_value_info(NOISY_IMAGE, TensorProto.FLOAT, volume(1)),
        helper.make_tensor_value_info(CONDITION, TensorProto.FLOAT, volume(2)),
        helper.make_tensor_value_info(TIMESTEP, TensorProto.FLOAT, ["batch"]),
    ]
    nan = helper.make_tensor("nan", TensorProto.FLOAT, [], [math.nan])
    graph = helper.make_graph(
        [helper.make_node("Mul", [NOISY_IMAGE, "nan"], [output])],
        "nan",
        inputs,
        [helper.make_tensor_value_info(output, output_type, output_dims or volume(1))],
        [nan],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def copy_repository(demo_repository: Path, folder: Path) -> Path:
    repo = folder / "models"
    shutil.copytree(demo_repository, repo)
    return repo


def manifest_path(repo: Path) -> Path:
    return repo / MODEL / "1" / "manifest.json"


def edit_manifest(repo: Path, edit) -> None:
    path = manifest_path(repo)
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def install_graph(repo: Path, graph: onnx.ModelProto) -> None:
    """Put `graph` in place of the model's, its manifest's hash and size updated to match."""
    path = repo / MODEL / "1" / "model.onnx"
    path.unlink()  # the export may have linked it to the _cpu entry's copy
    onnx.save(graph, path)
    edit_manifest(repo, lambda m: m["onnx"].update(sha256=sha256_of(path), size=path.stat().st_size))
