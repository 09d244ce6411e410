"""The app on a damaged or untrusted model: refused with exit code 5 before sampling, or, for a graph that computes
NaN, the mask failed instead of written; an edited manifest is recorded under its own digest."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest

from meddpm.imaging.phantom_heads import make_phantom
from tests.helpers import concurrently, run_app
from tests.model_samples import MODEL, copy_repository, edit_manifest, install_graph, manifest_path, nan_graph

pytestmark = pytest.mark.slow
STEPS = ("--scheduler", "ddim", "--steps", "2")


@pytest.fixture(scope="module")
def mask(tmp_path_factory):
    labels, _ = make_phantom(np.random.default_rng(1), (32, 32, 32), 6.0)
    path = tmp_path_factory.mktemp("mask") / "head.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.diag([6.0, 6.0, 6.0, 1.0])), path)
    return path


def test_a_graph_that_computes_nan_fails_the_mask_and_writes_nothing(demo_repository, mask, tmp_path):
    repo = copy_repository(demo_repository, tmp_path)
    install_graph(repo, nan_graph())
    result = run_app("-i", mask, "-o", tmp_path / "out", "-m", repo, *STEPS)
    assert result.returncode == 1, result.stderr
    assert "0 mask(s) synthesised, 1 failed" in result.stdout and "internal error" not in result.stdout
    graph = repo / MODEL / "1" / "model.onnx"
    assert f"FAILED head: {graph}: the model computed non-finite values (NaN or infinity)" in result.stdout
    assert not (tmp_path / "out" / "head").exists()


def test_an_unused_entry_whose_config_does_not_parse_is_a_model_error(demo_repository, mask, tmp_path):
    repo = copy_repository(demo_repository, tmp_path)
    (repo / "other" / "1").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text('name: "other"\nplatform: {\n')
    result = run_app("-i", mask, "-o", tmp_path / "out", "-m", repo, *STEPS)
    assert result.returncode == 5, result.stderr
    assert f"Failed to parse config file {repo / 'other' / 'config.pbtxt'}" in result.stderr
    assert "Traceback" not in result.stderr and "move it out of the repository" in result.stderr


def test_an_edited_manifest_is_recorded_under_its_digest_and_refused_where_another_is_pinned(
    demo_repository, mask, tmp_path
):
    repo = copy_repository(demo_repository, tmp_path)
    exported = hashlib.sha256(manifest_path(repo).read_bytes()).hexdigest()
    edit_manifest(repo, lambda m: m["preset"]["condition"].update(labels=[2, 1]))  # valid, but not what was exported
    edited = hashlib.sha256(manifest_path(repo).read_bytes()).hexdigest()

    recorded, refused = concurrently(
        lambda: run_app("-i", mask, "-o", tmp_path / "out", "-m", repo, *STEPS, "--model-sha256", edited.upper()),
        lambda: run_app("-i", mask, "-o", tmp_path / "out2", "-m", repo, *STEPS, env={"MEDDPM_MODEL_SHA256": exported}),
    )
    assert recorded.returncode == 0, recorded.stderr
    record = json.loads((tmp_path / "out" / "head" / "record.json").read_text())
    assert record["model"]["manifest_sha256"] == edited
    assert record["model"]["sha256_verified"][str(manifest_path(repo))] == edited

    assert refused.returncode == 5, refused.stderr
    assert f"SHA-256 {edited}, but --model-sha256 (MEDDPM_MODEL_SHA256) pins {exported}" in refused.stderr
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())
