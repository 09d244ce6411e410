"""A model as `python -m export` wrote it into a Triton model repository, seen from the client side."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from meddpm.errors import ConfigurationError, ModelError
from meddpm.model.manifest import MANIFEST, ONNX_SHA256, Manifest, sha256_of
from meddpm.model.presets import Preset
from meddpm.model.tensors import CONDITION, NOISY_IMAGE, sample_shapes

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2 as mc

# Other entries exported for the same model (see export/repository.py): the graph on the python backend, a
# TensorRT plan, the server-side sampling loop.
CPU_SUFFIX, TRT_SUFFIX, SAMPLER_SUFFIX = "_cpu", "_trt", "_sampler"
VARIANT_SUFFIXES = (CPU_SUFFIX, TRT_SUFFIX, SAMPLER_SUFFIX)


@dataclasses.dataclass
class ServedModel:
    name: str
    folder: Path
    manifest: Manifest
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


def find_model(repository: Path, name: str | None = None, expected_preset: str | None = None) -> ServedModel:
    """The model `name` of a repository (or the only one), checked against its manifest and graph."""
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
    model = _load(repository / name)
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
    try:
        config = text_format.Parse(path.read_text(), mc.ModelConfig())
    except (OSError, text_format.ParseError) as error:
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


def _load(folder: Path) -> ServedModel:
    model = ServedModel(folder.name, folder, Manifest.read(folder / "1" / MANIFEST))
    _check_graph(model)
    _check_onnx_hash(model)
    return model


def _check_graph(model: ServedModel) -> None:
    """The graph's inputs must have the channel counts the preset feeds it."""
    import onnx  # here: a heavy import, needed only for this check

    try:
        graph = onnx.load(str(model.onnx_path), load_external_data=False).graph
    except Exception as error:
        raise ModelError(
            f"{model.onnx_path}: missing or unreadable ONNX graph ({error}); re-run `python -m export`"
        ) from None
    found = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    shapes = sample_shapes(model.preset)
    for tensor in (NOISY_IMAGE, CONDITION):
        channels = shapes[tensor][0]
        dims = found.get(tensor)
        if dims is None or len(dims) != 5 or dims[1] != channels:
            raise ModelError(
                f"{model.onnx_path}: input '{tensor}' is {dims}, but preset '{model.preset.name}' in the manifest "
                f"needs [batch, {channels}, depth, height, width]; the graph and manifest do not belong together: "
                f"re-run `python -m export`"
            )


def _check_onnx_hash(model: ServedModel) -> None:
    """The graph must be the one exported: a file changed since (weights edited, copied over) is refused."""
    found, expected = sha256_of(model.onnx_path), model.manifest.onnx.sha256
    if found != expected:
        raise ModelError(
            f"{model.onnx_path}: SHA-256 {found}, but {model.manifest_path} states {expected}: the graph changed "
            f"after export (weights edited, or another file copied over it); re-run `python -m export` to export "
            f"and verify the model again"
        )
    model.verified[str(model.onnx_path)] = found
