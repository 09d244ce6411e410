"""Fixtures the integration tests share: the Triton server that serves the demo model, and the phantom masks of
runs whose mask is not the point.

A test that only calls the shared server takes `triton`; a test that kills, pauses or restarts a server, unloads
one of its models or serves a repository of its own starts a server of its own (test_triton.py's `own_triton`,
test_server_loop.py's `fault_triton`), so that no test sees what another did to a server.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from export.cli import main as export_main
from harness.local_triton import DEFAULT_VENV, LocalTriton
from meddpm.imaging.phantom_heads import make_phantom
from meddpm.model.checkpoint import save_meddpm_checkpoint
from meddpm.model.served_model import ServedModel, find_model
from meddpm.model.unet import build_unet
from tests.conftest import randomise
from tests.helpers import write_mask

SIX_MM = np.diag([6.0, 6.0, 6.0, 1.0])
# What `triton` loads of served_repository: all but other_head_sampler, which no test calls (a sampler entry's two
# instances take most of a server's start-up and shutdown)
SHARED_MODELS = ("meddpm_demo_cpu", "meddpm_demo_sampler", "other_head_cpu")


@pytest.fixture(scope="session")
def triton_venv() -> Path:
    """The virtual environment whose tritonserver the tests start."""
    if not (DEFAULT_VENV / "bin" / "python").exists():
        pytest.fail(f"{DEFAULT_VENV} is missing: run scripts/setup_triton.sh (scripts/test.sh does)")
    return DEFAULT_VENV


@pytest.fixture(scope="session")
def served_repository(triton_venv, demo_repository, presets, test_presets_file, tmp_path_factory) -> Path:
    """The demo model, plus a model of another preset (16^3 grid) to be called by mistake. Tests read it, and
    copy it to change it."""
    repository = tmp_path_factory.mktemp("served") / "models"
    shutil.copytree(demo_repository, repository)
    checkpoint = repository.parent / "other.pt"
    save_meddpm_checkpoint(checkpoint, randomise(build_unet(presets["tiny"]), seed=3), presets["tiny"], step=1)
    assert (
        export_main(
            [
                "--checkpoint",
                str(checkpoint),
                "--preset",
                "tiny",
                "--presets",
                str(test_presets_file),
                "--repository",
                str(repository),
                "--name",
                "other_head",
            ]
        )
        == 0
    )
    return repository


@pytest.fixture(scope="package")
def triton(served_repository):
    """The Triton server of every integration test that only calls it (started once; stopped when the integration
    tests end, not kept through the unit tests)."""
    with LocalTriton(served_repository, models=SHARED_MODELS) as server:
        yield server


@pytest.fixture(scope="session")
def model(served_repository) -> ServedModel:
    """The demo model as `triton` serves it."""
    return find_model(served_repository, "meddpm_demo")


@pytest.fixture(scope="session")
def mask_folder(tmp_path_factory) -> Path:
    """A folder holding one 32^3 phantom mask, head.nii.gz, on the demo model's own grid."""
    folder = tmp_path_factory.mktemp("masks")
    labels, _ = make_phantom(np.random.default_rng(5), (32, 32, 32), 6.0)
    nib.save(nib.Nifti1Image(labels, SIX_MM), folder / "head.nii.gz")
    return folder


@pytest.fixture(scope="session")
def head() -> np.ndarray:
    """A 32^3 phantom label mask of 6 mm voxels, for runs whose mask is not the point."""
    mask, _ = make_phantom(np.random.default_rng(31), (32, 32, 32), 6.0)
    return mask


@pytest.fixture
def head_file(head, tmp_path) -> Path:
    """`head` written to tmp_path / head.nii.gz, with a patient's name in its header (tests.helpers.PATIENT)."""
    return write_mask(tmp_path / "head.nii.gz", head, SIX_MM)
