"""A model as `python -m export` wrote it into a Triton model repository, seen from the client side."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from meddpm.errors import ConfigurationError, ModelError
from meddpm.model.manifest import MANIFEST, MANIFEST_BYTES, ONNX_SHA256, Manifest, read_regular
from meddpm.model.presets import Preset
from meddpm.model.tensors import DTYPE, INPUTS, PREDICTED_NOISE, graph_shapes

if TYPE_CHECKING:
    import onnx
    from tritonclient.grpc import model_config_pb2 as mc


class Entry(StrEnum):
    """The repository entries `python -m export` writes for one model NAME (export/repository.py); each value is
    the suffix of the entry's folder."""

    UNET = ""  # NAME: the graph on Triton's ONNX Runtime backend (GPU instances)
    OPENVINO = "_openvino"  # the same graph on Triton's OpenVINO backend: CPU servers running the stock container
    CPU = "_cpu"  # the same graph on the python backend (OpenVINO, else ONNX Runtime, inside)
    TRT = "_trt"  # a TensorRT plan built from the graph
    SAMPLER = "_sampler"  # the server-side sampling loop, calling one of the others through BLS


VARIANT_SUFFIXES = tuple(entry.value for entry in Entry if entry.value)  # what a model's own name may not end in
CONFIG_BYTES = 1 << 20  # a config.pbtxt is a few kB
PINNED_BY = "--model-sha256 (MEDDPM_MODEL_SHA256)"  # the setting that pins the manifest a site trusts


@dataclasses.dataclass
class ServedModel:
    name: str
    folder: Path
    manifest: Manifest
    manifest_sha256: str  # of the file read: an edited manifest has another
    verified: dict[str, str] = dataclasses.field(default_factory=dict)  # hashes checked before the first step

    @property
    def preset(self) -> Preset:
        return self.manifest.preset

    @property
    def onnx_path(self) -> Path:
        return self.folder / "1" / "model.onnx"

    @property
    def manifest_path(self) -> Path:
        return self.folder / "1" / MANIFEST

    def check_served_hash(self, parameters: Mapping, parameter: str, where: str) -> None:
        """A served config's `parameters` must record the manifest's hash (ONNX_SHA256 or PACKAGE_SHA256)."""
        record = self.manifest.onnx if parameter == ONNX_SHA256 else self.manifest.sampler_package
        expected = record.sha256
        found = parameters[parameter].string_value if parameter in parameters else None
        if found != expected:
            raise ModelError(
                f"{where} records {parameter} {found or 'none'} in its config, but {self.manifest_path} states "
                f"{expected}: the server serves another export than -m holds; serve the repository that "
                f"`python -m export` wrote with this manifest (re-run the export for both), or point -m at it"
            )
        self.verified[f"{where}, config parameter {parameter}"] = found


def find_model(
    repository: Path, name: str | None = None, expected_preset: str | None = None, expected_sha256: str | None = None
) -> ServedModel:
    """The model `name` of a repository (or the only one), checked against its manifest and graph; with
    `expected_sha256`, its manifest must be the file of that digest (a model the site pinned)."""
    if not repository.is_dir():
        raise ModelError(f"{repository}: no such model repository; create one with `python -m export`")
    if (repository / "config.pbtxt").exists():  # pointed at one model's folder
        repository, name = repository.parent, name or repository.name
    try:
        entries = sorted(p.name for p in repository.iterdir() if (p / "1" / MANIFEST).is_file())
    except OSError as error:
        raise ModelError(f"{repository}: cannot list the model repository ({error.strerror})") from None
    models = [e for e in entries if not e.endswith(VARIANT_SUFFIXES)]
    if not models:
        raise ModelError(
            f"{repository}: holds no exported Med-DDPM model; run `python -m export --repository {repository} ...`"
        )
    if name is None:
        if len(models) > 1:
            raise ConfigurationError(
                f"{repository} holds several models ({', '.join(models)}); pick one with --model-name"
            )
        name = models[0]
    name = _base_name(name)
    if name not in models:
        raise ConfigurationError(f"model '{name}' is not in {repository}; available: {', '.join(models)}")
    for entry in entries:  # the model's entries, as Triton would load them
        if _base_name(entry) == name:
            read_config(repository / entry)
    model = _load(repository / name, expected_sha256)
    if expected_preset and model.preset.name != expected_preset:
        raise ModelError(
            f"{model.folder}: model '{name}' was exported for preset '{model.preset.name}', not '{expected_preset}'; "
            f"pick the matching model with --model-name or drop --preset"
        )
    return model


def read_config(folder: Path) -> mc.ModelConfig:
    """A repository entry's config.pbtxt; its model name must be the folder's, or Triton refuses to load it."""
    from google.protobuf import text_format  # here: only this check needs Triton's config definitions
    from tritonclient.grpc import model_config_pb2 as mc

    path = folder / "config.pbtxt"
    text = read_regular(path, CONFIG_BYTES, "model config")
    try:
        if len(text) > CONFIG_BYTES:
            raise ValueError(f"more than {CONFIG_BYTES} bytes")
        config = text_format.Parse(text, mc.ModelConfig())
    except (ValueError, text_format.ParseError) as error:
        raise ModelError(f"{path}: unreadable model config ({error}); re-run `python -m export`") from None
    if config.name and config.name != folder.name:
        raise ModelError(
            f"{path}: names the model '{config.name}', but its folder is '{folder.name}', and Triton loads a model "
            f"only from the folder of its name; rename the folder back to '{config.name}', or export the model under "
            f"the new name (`python -m export --name {_base_name(folder.name)} ...`)"
        )
    return config


def _base_name(name: str) -> str:
    for suffix in VARIANT_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def _load(folder: Path, expected_sha256: str | None) -> ServedModel:
    path = folder / "1" / MANIFEST
    text = read_regular(path, MANIFEST_BYTES, "manifest")
    digest = hashlib.sha256(text).hexdigest()
    if expected_sha256 and digest != expected_sha256:
        raise ModelError(
            f"{path}: SHA-256 {digest}, but {PINNED_BY} pins {expected_sha256}: this is not the model this site "
            f"trusts (the manifest was edited, or the repository holds another export); point -m at the pinned "
            f"export, or pin this one with its digest (`sha256sum {path}`) once it is trusted"
        )
    model = ServedModel(folder.name, folder, Manifest.parse(text, path), digest)
    if expected_sha256:
        model.verified[str(path)] = digest
    verification = model.manifest.verification
    if not verification["passed"]:
        raise ModelError(
            f"{path}: the export's verification did not pass (max relative error "
            f"{verification['max_relative_error']:.2e} > tolerance {verification['tolerance']:.0e}): the graph does "
            f"not compute what the checkpoint does; re-run `python -m export`"
        )
    _check_graph(model, _read_graph(model))
    return model


def _read_graph(model: ServedModel) -> bytes:
    """The graph's bytes, hashed before anything parses them: a file changed since export (weights edited, copied
    over) is refused, one larger than the manifest states without reading more of it."""
    path, record = model.onnx_path, model.manifest.onnx
    data = read_regular(path, record.size, "ONNX graph")
    changed = (
        "the graph changed after export (weights edited, or another file copied over it); re-run `python -m export` "
        "to export and verify the model again"
    )
    if len(data) > record.size:
        raise ModelError(f"{path}: larger than the {record.size} bytes {model.manifest_path} states: {changed}")
    found = hashlib.sha256(data).hexdigest()
    if found != record.sha256:
        raise ModelError(f"{path}: SHA-256 {found}, but {model.manifest_path} states {record.sha256}: {changed}")
    model.verified[str(path)] = found
    return data


def _check_graph(model: ServedModel, data: bytes) -> None:
    """The graph's and the manifest's tensors must be the contract's (meddpm.model.tensors): the inputs in order and
    the output, float32, each of the rank and channels the manifest's preset needs."""
    import onnx  # here: a heavy import, needed only for this check

    path, preset = model.onnx_path, model.preset
    try:
        graph = onnx.load_from_string(data).graph
    except Exception as error:
        raise ModelError(f"{path}: unreadable ONNX graph ({error}); re-run `python -m export`") from None
    contract = f"the tensor contract ({', '.join(INPUTS)} -> {PREDICTED_NOISE})"
    record = model.manifest.onnx
    if (tuple(record.inputs), record.output) != (INPUTS, PREDICTED_NOISE):
        raise ModelError(
            f"{model.manifest_path}: records the tensors {', '.join(record.inputs)} -> {record.output}, not "
            f"{contract}; re-run `python -m export`"
        )
    inputs, outputs = [t.name for t in graph.input], [t.name for t in graph.output]
    if (inputs, outputs) != (list(INPUTS), [PREDICTED_NOISE]):
        raise ModelError(
            f"{path}: takes {', '.join(inputs) or 'nothing'} and returns {', '.join(outputs) or 'nothing'}, not "
            f"{contract}; re-run `python -m export`"
        )
    shapes = graph_shapes(preset)
    for kind, tensors in (("input", graph.input), ("output", graph.output)):
        for tensor in tensors:
            dtype, dims = _signature(tensor)
            shape = shapes[tensor.name]
            if dtype != DTYPE or len(dims) != len(shape) or any(s is not None and d != s for d, s in zip(dims, shape)):
                raise ModelError(
                    f"{path}: {kind} '{tensor.name}' is {dtype} {_shown(dims)}, but preset '{preset.name}' in the "
                    f"manifest needs {DTYPE} {_shown(shape)}; the graph and manifest do not belong together: re-run "
                    f"`python -m export`"
                )


def _signature(tensor: onnx.ValueInfoProto) -> tuple[str, list[int | str | None]]:
    """A graph tensor's element type (numpy's name) and dimensions (a size, a symbolic name, or None: unknown)."""
    import onnx

    kind = tensor.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type).name
    except KeyError:
        dtype = "untyped"
    return dtype, [d.dim_value or d.dim_param or None for d in kind.shape.dim]


def _shown(dims: Sequence[int | str | None]) -> str:
    """Dimensions as [batch, 2, depth, height, width]: a free one by its role."""
    roles = ("batch", "channels", "depth", "height", "width") + ("?",) * len(dims)
    return f"[{', '.join(str(role if d is None else d) for d, role in zip(dims, roles))}]"
