"""Shared fixtures: tiny presets for fast tests, randomised models, the reference key list."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from meddpm.model.presets import Preset, load_presets

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"  # public Med-DDPM files, sources in tests/data/README.md
REFERENCE_KEYS = TEST_DATA / "meddpm_checkpoint_keys.txt"
DEMO_CHECKPOINT = REPO / "models" / "demo" / "model_demo.pt"  # phantom heads: the tests' model
MNI152_DEMO_CHECKPOINT = REPO / "models" / "mni152-demo" / "model.pt"  # heads from the MNI152 template: the demo's

# Small networks with the features of the real ones: attention inside a level ("tiny"), several output
# channels, binary condition scaling and unreversed axes ("tiny-multi").
TEST_PRESETS = """
[presets.tiny]
description = "test: 3 levels, attention at factor 2"
[presets.tiny.unet]
model_channels = 8
num_res_blocks = 1
channel_mult = [1, 2, 2]
attention_factors = [2]
norm_groups = 4
[presets.tiny.condition]
labels = [1, 2]
scale = "symmetric"
[presets.tiny.image]
channels = ["T1"]
grid = [16, 16, 16]
voxel_size_mm = [4.0, 4.0, 4.0]
orientation = "RAS"
axis_order = "reversed"
[presets.tiny.schedule]
timesteps = 250
beta_schedule = "squaredcos_cap_v2"
default_scheduler = "ddpm"
default_steps = 250

[presets.tiny-multi]
description = "test: BraTS-like, 2 outputs, 3 labels, 2 res blocks"
[presets.tiny-multi.unet]
model_channels = 8
num_res_blocks = 2
channel_mult = [1, 2]
attention_factors = []
norm_groups = 4
[presets.tiny-multi.condition]
labels = [1, 2, 4]
scale = "binary"
[presets.tiny-multi.image]
channels = ["T1", "FLAIR"]
grid = [8, 12, 16]
voxel_size_mm = [2.0, 2.0, 2.0]
orientation = "RAS"
axis_order = "as-is"
[presets.tiny-multi.schedule]
timesteps = 250
beta_schedule = "squaredcos_cap_v2"
default_scheduler = "ddim"
default_steps = 10
"""


@pytest.fixture(scope="session")
def test_presets_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("presets") / "test_presets.toml"
    path.write_text(TEST_PRESETS)
    return path


@pytest.fixture(scope="session")
def presets(test_presets_file) -> dict[str, Preset]:
    return load_presets(test_presets_file)


def _export_committed(checkpoint: Path, preset: str, repo: Path) -> Path:
    from export.cli import main as export_main

    if not checkpoint.exists():
        pytest.fail(f"{checkpoint} is missing: it is committed; run training/train_demo.py to recreate it")
    assert export_main(["--checkpoint", str(checkpoint), "--preset", preset, "--repository", str(repo)]) == 0
    return repo


@pytest.fixture(scope="session")
def demo_repository(tmp_path_factory) -> Path:
    """The committed phantom demo model exported into a fresh model repository."""
    return _export_committed(DEMO_CHECKPOINT, "demo", tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="session")
def mni152_demo_repository(tmp_path_factory) -> Path:
    """The committed model on MNI152 anatomy (scripts/demo.sh's) exported into a fresh model repository."""
    return _export_committed(MNI152_DEMO_CHECKPOINT, "mni152-demo", tmp_path_factory.mktemp("mni152-repo"))


@pytest.fixture(scope="module")
def phantom():
    """A 32^3 phantom mask on an oblique 6 mm grid, its 'acquired' MR series (with patient data) and its SEG."""
    import numpy as np

    from meddpm.dicom.phantom_study import image_series, oblique_affine, segmentation
    from meddpm.imaging.phantom_heads import make_phantom
    from tests.dicom_samples import study

    labels, _ = make_phantom(np.random.default_rng(3), (32, 32, 32), 6.0)
    affine = oblique_affine(labels.shape, 6.0)
    source_study = study()
    mr = image_series(labels.astype(np.uint16) * 400, affine, source_study, 3, "T1 MPRAGE")
    return labels, affine, source_study, mr, segmentation(mr, labels)


def served_runtime(model):
    """The runtime the local Triton's `_cpu` model runs (harness/local_triton.py), in this process: OpenVINO, FP32."""
    from meddpm.backends.openvino_denoiser import OpenVinoDenoiser
    from meddpm.model.presets import Precision

    return OpenVinoDenoiser(model.onnx_path, Precision.FP32, model.preset.schedule.timesteps)


def randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter random values (a fresh Med-DDPM model outputs exactly zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return module


def edit_weights(path: Path) -> None:
    """Scale one weight of an exported graph in place, as an edit after export would."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path))
    weight = graph.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    onnx.save(graph, str(path))


def reference_keys() -> dict[str, dict[str, tuple[int, ...]]]:
    """{preset: {tensor name: shape}} from the reference list read off Med-DDPM's own code."""
    sections: dict[str, dict[str, tuple[int, ...]]] = {}
    current = None
    for line in REFERENCE_KEYS.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line[1 : line.index("]")], {})
            continue
        name, shape = line.split(" ", 1)
        current[name] = tuple(int(v) for v in re.findall(r"\d+", shape))
    return sections


def pytest_configure(config):
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")
