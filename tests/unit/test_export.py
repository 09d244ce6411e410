"""ONNX export parity, verification that can fail, Triton configs that parse and match the graph."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export import onnx_graph, repository
from export.cli import main as export_main
from meddpm.errors import ExportVerificationError, ModelError
from meddpm.model.checkpoint import save_meddpm_checkpoint
from meddpm.model.manifest import ONNX_SHA256, PACKAGE_SHA256, Manifest, sha256_of
from meddpm.model.served_model import Entry, find_model, read_config
from meddpm.model.tensors import CONDITION, INPUTS, NOISY_IMAGE, PREDICTED_NOISE, TIMESTEP
from meddpm.model.unet import (
    AttentionBlock,
    ConditionalDenoiser,
    build_unet,
    timestep_embedding,
)
from meddpm.sampling import sampler_files
from tests.conftest import REPO, TEST_DATA, edit_weights, randomise


@pytest.fixture(scope="module")
def tiny_models(presets, tmp_path_factory):
    """Randomised tiny models exported once for the module: {preset: (model, onnx path)}."""
    folder = tmp_path_factory.mktemp("onnx")
    exported = {}
    for name in ("tiny", "tiny-multi"):
        model = ConditionalDenoiser(randomise(build_unet(presets[name]), seed=3)).eval()
        path = folder / f"{name}.onnx"
        onnx_graph.export_onnx(model, presets[name], path)
        exported[name] = (model, path)
    return exported


@pytest.mark.parametrize("name", ["tiny", "tiny-multi"])
def test_onnx_matches_torch_at_several_timesteps_and_batch_sizes(tiny_models, presets, name):
    model, path = tiny_models[name]
    verification = onnx_graph.verify_onnx(path, model, presets[name])
    assert verification.passed, verification.to_dict()
    assert {c.batch for c in verification.cases} == {1, 2}
    assert any(t != int(t) for c in verification.cases for t in c.timesteps), "a fractional timestep is verified"
    assert all(c.max_abs_reference > 0.1 for c in verification.cases), "randomised weights give non-trivial output"


def test_onnx_graph_interface(tiny_models):
    graph = onnx.load(str(tiny_models["tiny-multi"][1])).graph
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*graph.input, *graph.output]
    }
    assert [v.name for v in graph.input] == list(INPUTS) and [v.name for v in graph.output] == [PREDICTED_NOISE]
    assert dims[NOISY_IMAGE] == ["batch", 2, "depth", "height", "width"]
    assert dims[CONDITION] == ["batch", 3, "depth", "height", "width"]
    assert dims[TIMESTEP] == ["batch"]
    assert graph.input[2].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims[PREDICTED_NOISE][:2] == ["batch", 2]


def test_verification_fails_for_a_different_network(tiny_models, presets):
    model, path = tiny_models["tiny"]
    other = ConditionalDenoiser(randomise(build_unet(presets["tiny"]), seed=4)).eval()
    verification = onnx_graph.verify_onnx(path, other, presets["tiny"])
    assert not verification.passed
    with pytest.raises(ExportVerificationError, match="differs from the PyTorch model"):
        onnx_graph.require_passed(verification, path)


def test_attention_equals_the_legacy_formula(presets):
    block = randomise(AttentionBlock(16, groups=4), seed=5)
    x = torch.randn(2, 16, 4, 4, 4)
    tokens = x.reshape(2, 16, -1)
    q, k, v = block.qkv(block.norm(tokens)).split(16, dim=1)
    scale = 1 / math.sqrt(math.sqrt(16))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    legacy = (tokens + block.proj_out(torch.einsum("bts,bcs->bct", weight, v))).reshape(x.shape)
    torch.testing.assert_close(block(x), legacy, rtol=1e-5, atol=1e-5)


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 17.5, 249.0])
    emb = timestep_embedding(t, 8)
    freqs = np.exp(-np.log(1000.0) * np.arange(4) / 4)
    expected = np.concatenate([np.cos(t.numpy()[:, None] * freqs), np.sin(t.numpy()[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(emb.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_export_command_writes_a_verified_repository(presets, test_presets_file, tmp_path, capsys):
    checkpoint = tmp_path / "tiny.pt"
    save_meddpm_checkpoint(checkpoint, randomise(build_unet(presets["tiny"]), seed=6), presets["tiny"], step=1)
    repo = tmp_path / "repo"
    code = export_main(
        [
            "--checkpoint",
            str(checkpoint),
            "--preset",
            "tiny",
            "--presets",
            str(test_presets_file),
            "--repository",
            str(repo),
            "--max-batch-size",
            "3",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "PASSED: max relative error" in out and "max abs error" in out

    for entry in ("meddpm_tiny", "meddpm_tiny_openvino", "meddpm_tiny_cpu"):
        config = read_config(repo / entry)
        assert config.name == entry and config.max_batch_size == (1 if entry.endswith("_openvino") else 3)
        graph = onnx.load(str(repo / entry / "1" / "model.onnx")).graph
        graph_inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim][1:] for i in graph.input}
        for tensor in config.input:
            assert tensor.name in graph_inputs
            if tensor.name != TIMESTEP:
                assert list(tensor.dims)[0] == graph_inputs[tensor.name][0]
                assert list(tensor.dims)[1:] == list(presets["tiny"].image.grid)
        assert [o.name for o in config.output] == [o.name for o in graph.output]
    assert read_config(repo / "meddpm_tiny_cpu").backend == "python"
    assert (repo / "meddpm_tiny_cpu" / "1" / "model.py").is_file()
    sampler = read_config(repo / "meddpm_tiny_sampler")
    assert (
        sampler.model_transaction_policy.decoupled
        and sampler.parameters["unet_models"].string_value == "meddpm_tiny:3,meddpm_tiny_openvino:1,meddpm_tiny_cpu:3"
    )
    check_openvino_backend_would_load(repo / "meddpm_tiny_openvino")
    copied = repo / "meddpm_tiny_sampler" / "1" / "meddpm"  # the app's own loop, and only the sampling core
    assert sorted(p.relative_to(copied).as_posix() for p in copied.rglob("*.py")) == sorted(sampler_files.FILES)

    manifest = Manifest.read(repo / "meddpm_tiny" / "1" / "manifest.json")
    assert manifest.checkpoint.file == "tiny.pt" and len(manifest.checkpoint.sha256) == 64
    # The hashes of what runs: in the manifest, and in each config for a server's client and the server itself
    onnx_sha256 = sha256_of(repo / "meddpm_tiny" / "1" / "model.onnx")
    package_sha256 = sha256_of(repo / "meddpm_tiny_sampler" / "1" / "meddpm")
    assert (
        manifest.onnx.sha256 == onnx_sha256
        and manifest.sampler_package.sha256 == package_sha256 == sampler_files.code_sha256()
    )
    for entry in ("meddpm_tiny", "meddpm_tiny_cpu"):
        assert read_config(repo / entry).parameters[ONNX_SHA256].string_value == onnx_sha256
    assert sampler.parameters[PACKAGE_SHA256].string_value == package_sha256
    assert manifest.verification_passed and manifest.versions["torch"].startswith("2.13")
    served = find_model(repo)
    assert served.name == "meddpm_tiny" and served.preset == presets["tiny"]


def test_export_command_reports_a_bad_checkpoint(tmp_path, capsys):
    (tmp_path / "bad.pt").write_text("nope")
    code = export_main(
        ["--checkpoint", str(tmp_path / "bad.pt"), "--preset", "whole-head", "--repository", str(tmp_path / "r")]
    )
    assert code == 4 and "not a PyTorch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["../escaped", "a/b", "..", ".hidden", "", "head_cpu", "head_sampler", "head_trt"])
def test_export_takes_a_plain_model_name_only(name, presets, test_presets_file, tmp_path, capsys):
    checkpoint = tmp_path / "tiny.pt"
    save_meddpm_checkpoint(checkpoint, randomise(build_unet(presets["tiny"]), seed=6), presets["tiny"], step=1)
    code = export_main(
        [
            "--checkpoint",
            str(checkpoint),
            "--preset",
            "tiny",
            "--presets",
            str(test_presets_file),
            "--repository",
            str(tmp_path / "repo" / "models"),
            "--name",
            name,
        ]
    )
    assert code == 2 and f"model name '{name}' is not a plain model name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["tiny.pt"], "nothing written"


def test_tensorrt_plan_without_tensorrt_says_how(presets, test_presets_file, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed: the plan is built, not refused")
    except ImportError:
        pass
    checkpoint = tmp_path / "tiny.pt"
    save_meddpm_checkpoint(checkpoint, build_unet(presets["tiny"]), presets["tiny"], step=1)
    code = export_main(
        [
            "--checkpoint",
            str(checkpoint),
            "--preset",
            "tiny",
            "--presets",
            str(test_presets_file),
            "--repository",
            str(tmp_path / "repo"),
            "--tensorrt-plan",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no tensorrt" in err and "trtexec --onnx=" in err and "InstanceNormalization*:fp32" in err


@pytest.mark.parametrize(
    ("exported", "entry"),
    [
        (fixture, f"{model}{suffix}")
        for fixture, model in (("demo_repository", "meddpm_demo"), ("mni152_demo_repository", "meddpm_mni152_demo"))
        for suffix in ("", "_openvino", "_cpu", "_sampler")
    ],
)
def test_committed_configs_are_what_export_writes(request, exported, entry):
    """Less the export's hashes: the sampler's changes with any edit of meddpm/, the graph's with torch's version."""
    repository_folder = request.getfixturevalue(exported)
    config = read_config(repository_folder / entry)
    hashes = [key for key in (ONNX_SHA256, PACKAGE_SHA256) if key in config.parameters]
    assert len(hashes) == 1
    del config.parameters[hashes[0]]
    assert (TEST_DATA / "model_repository" / entry / "config.pbtxt").read_text() == repository.config_text(config)
    assert (repository_folder / entry / "1" / ".gitkeep").exists()


def test_the_demo_exports_where_git_does_not_look():
    """scripts/demo.sh then scripts/test.sh on one clone: the demo's export rewrites configs whose hashes depend on
    the machine, so it must write where no file is tracked and git ignores what it writes."""
    [command] = [line for line in (REPO / "scripts" / "demo.sh").read_text().splitlines() if " -m export " in line]
    target = command.split("--repository ")[1].split()[0]
    tracked = subprocess.run(["git", "ls-files", "--", target], cwd=REPO, capture_output=True, text=True, check=True)
    assert tracked.stdout == "", f"the demo exports into {target}, where git tracks {tracked.stdout.split()}"
    probe = f"{target}/meddpm_mni152_demo/config.pbtxt"
    assert subprocess.run(["git", "check-ignore", "-q", "--no-index", probe], cwd=REPO).returncode == 0, probe


def test_a_graph_changed_after_export_is_refused_naming_both_hashes(demo_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(demo_repository, repo)
    path = repo / "meddpm_demo" / "1" / "model.onnx"
    exported = sha256_of(path)
    edit_weights(path)
    with pytest.raises(ModelError) as error:
        find_model(repo)
    message = str(error.value)
    assert f"SHA-256 {sha256_of(path)}, but {path.parent / 'manifest.json'} states {exported}" in message
    assert "re-run `python -m export`" in message
    path.write_bytes((demo_repository / "meddpm_demo" / "1" / "model.onnx").read_bytes())
    assert find_model(repo).verified == {str(path): exported}


def test_tree_hash_covers_names_and_contents_not_pycache(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("a = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("b = 2\n")
    first = sha256_of(tmp_path / "pkg")
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"cache")
    assert sha256_of(tmp_path / "pkg") == first
    (tmp_path / "pkg" / "sub" / "b.py").write_text("b = 3\n")
    assert sha256_of(tmp_path / "pkg") != first
    (tmp_path / "pkg" / "sub" / "b.py").write_text("b = 2\n")
    (tmp_path / "pkg" / "sub" / "b.py").rename(tmp_path / "pkg" / "c.py")
    assert sha256_of(tmp_path / "pkg") != first


def test_tensorrt_accelerator_option():
    from meddpm.model.presets import get_preset

    config = repository.model_config("m", get_preset("whole-head"), Entry.UNET, 2, "0" * 64, tensorrt_accelerator=True)
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    assert list(config.input[0].dims) == [1, 128, 128, 128]


# What Triton's OpenVINO backend (triton-inference-server/openvino_backend, src/openvino.cc) reads from a config's
# parameters, and the values it accepts; it ignores other keys (such as our onnx_sha256).
OPENVINO_BACKEND_VALUES = {
    "PERFORMANCE_HINT": re.compile(r"latency|throughput|cumulative_throughput", re.IGNORECASE),
    "NUM_STREAMS": re.compile(r"auto|numa|\d+", re.IGNORECASE),
    "INFERENCE_NUM_THREADS": re.compile(r"\d+"),
    "COMPILATION_NUM_THREADS": re.compile(r"\d+"),
    "HINT_BF16": re.compile(r"yes", re.IGNORECASE),
}


def check_openvino_backend_would_load(entry: Path) -> None:
    """The stock container's OpenVINO backend is not installable here: check its config as that backend does.
    The file it loads exists; every parameter it reads has a value it accepts; a batch needs no padding (it refuses
    one below max_batch_size unless it pads); and each input's dims (or its reshape) match the graph as OpenVINO
    reads it, batch dimension aside (its CompareDimsSupported: equal, or dynamic in the graph)."""
    import openvino as ov

    config = read_config(entry)
    assert config.backend == "openvino" and config.max_batch_size == 1
    assert all(group.kind == group.KIND_CPU for group in config.instance_group)
    graph_file = entry / "1" / config.default_model_filename
    assert graph_file.is_file()
    for key, value in config.parameters.items():
        if key in OPENVINO_BACKEND_VALUES:
            assert OPENVINO_BACKEND_VALUES[key].fullmatch(value.string_value), (key, value.string_value)
    assert "ENABLE_BATCH_PADDING" not in config.parameters
    graph = ov.Core().read_model(str(graph_file))
    for tensors, port in ((config.input, graph.input), (config.output, graph.output)):
        for tensor in tensors:
            dims = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
            graph_dims = port(tensor.name).get_partial_shape()[1:]  # the batch dimension Triton adds
            assert len(graph_dims) == len(dims), (tensor.name, dims, graph_dims)
            assert all(g.is_dynamic or g.get_length() == d for g, d in zip(graph_dims, dims)), (tensor.name, dims)
