"""A model repository damaged after export is refused by find_model, before any sampling, naming what is wrong."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
from onnx import TensorProto

from meddpm.errors import ModelError
from meddpm.model.served_model import find_model
from tests.model_samples import MODEL, copy_repository, edit_manifest, install_graph, manifest_path, nan_graph, volume


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        (nan_graph(output="noise"), "returns noise, not the tensor contract (noisy_image, condition, timestep -> "),
        (nan_graph(output_dims=["batch", 1, "depth", "height"]), "output 'predicted_noise' is float32 [batch, 1, "),
        (nan_graph(output_dims=volume(2)), "output 'predicted_noise' is float32 [batch, 2, depth, height, width]"),
        (nan_graph(output_type=TensorProto.FLOAT16), "output 'predicted_noise' is float16 [batch, 1, depth, height"),
    ],
    ids=["output name", "output rank", "output channels", "output type"],
)
def test_a_graph_whose_output_is_not_the_tensor_contracts_is_refused(demo_repository, tmp_path, graph, expected):
    repo = copy_repository(demo_repository, tmp_path)
    install_graph(repo, nan_graph())
    assert find_model(repo).name == MODEL, "the NaN graph itself has the contract's signature"
    install_graph(repo, graph)
    with pytest.raises(ModelError, match="re-run `python -m export`") as error:
        find_model(repo)
    assert expected in str(error.value) and str(repo / MODEL / "1" / "model.onnx") in str(error.value)


@pytest.mark.parametrize(
    ("verification", "expected"),
    [
        ({}, "verification 'passed' is None, not true or false"),
        ({"passed": "yes"}, "verification 'passed' is 'yes', not true or false"),
        ({"passed": True, "tolerance": "tight"}, "verification 'tolerance' is 'tight', not a finite number"),
        ({"cases": []}, "verification 'cases' is not a list of the cases run"),
        ({"passed": False, "max_relative_error": 0.5}, "the export's verification did not pass (max relative error"),
    ],
)
def test_a_manifest_whose_verification_is_missing_malformed_or_failed_is_refused(
    demo_repository, tmp_path, verification, expected
):
    repo = copy_repository(demo_repository, tmp_path)
    exported = json.loads(manifest_path(repo).read_text())["verification"]
    edit_manifest(repo, lambda m: m.update(verification={} if not verification else exported | verification))
    with pytest.raises(ModelError, match="re-run `python -m export`") as error:
        find_model(repo)
    assert expected in str(error.value) and str(manifest_path(repo)) in str(error.value)


def test_a_graph_that_is_not_a_regular_file_is_refused_unread(demo_repository, tmp_path):
    """A FIFO would hold the read up for ever, a device would be read without end: both refused at once."""
    repo = copy_repository(demo_repository, tmp_path)
    graph = repo / MODEL / "1" / "model.onnx"
    graph.unlink()
    os.mkfifo(graph)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(refusal(repo)), daemon=True)
    reader.start()
    reader.join(timeout=120)  # the check itself takes well under a second
    if reader.is_alive():  # let the hung read end (it gets end of file) before failing
        os.close(os.open(graph, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("find_model waited on a FIFO")
    assert f"{graph}: the ONNX graph is not a regular file" in outcome[0]
    graph.unlink()
    graph.symlink_to("/dev/zero")
    assert f"{graph}: the ONNX graph is not a regular file" in refusal(repo)


def refusal(repo: Path) -> str:
    with pytest.raises(ModelError) as error:
        find_model(repo)
    return str(error.value)


def test_a_graph_larger_than_the_manifest_states_is_refused_without_hashing_it(demo_repository, tmp_path):
    repo = copy_repository(demo_repository, tmp_path)
    graph = repo / MODEL / "1" / "model.onnx"
    size = graph.stat().st_size
    with graph.open("ab") as file:
        file.write(b"\0" * 1024)
    assert f"{graph}: larger than the {size} bytes {manifest_path(repo)} states: the graph changed" in refusal(repo)


def test_the_manifest_digest_is_recorded_and_a_pinned_one_enforced(demo_repository, tmp_path):
    repo = copy_repository(demo_repository, tmp_path)
    exported = hashlib.sha256(manifest_path(repo).read_bytes()).hexdigest()
    model = find_model(repo, expected_sha256=exported)
    assert model.manifest_sha256 == exported and model.verified[str(manifest_path(repo))] == exported
    assert str(manifest_path(repo)) not in find_model(repo).verified, "only a pinned digest is checked"

    edit_manifest(repo, lambda m: m["preset"]["condition"].update(labels=[2, 1]))  # runs, but draws other anatomy
    edited = hashlib.sha256(manifest_path(repo).read_bytes()).hexdigest()
    assert find_model(repo).manifest_sha256 == edited != exported
    with pytest.raises(ModelError) as error:
        find_model(repo, expected_sha256=exported)
    assert f"{manifest_path(repo)}: SHA-256 {edited}, but --model-sha256 (MEDDPM_MODEL_SHA256) pins {exported}" in str(
        error.value
    )
