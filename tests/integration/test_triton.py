"""The UNet served by a real Triton server (harness/local_triton.py), driven over gRPC; faults against the real
server."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from harness import free_port
from harness.local_triton import LocalTriton, server_processes
from meddpm.backends.triton_client.client import TritonDenoiser, is_this_host
from meddpm.backends.triton_client.options import RetryPolicy
from meddpm.errors import ConfigurationError, ModelError, ServerError
from meddpm.imaging.geometry import condition_channels
from meddpm.imaging.phantom_heads import make_phantom
from meddpm.model.presets import Scheduler
from meddpm.model.served_model import ServedModel, find_model
from meddpm.sampling.loop import sample
from meddpm.sampling.request import SamplingRequest
from tests.conftest import REPO, served_runtime
from tests.helpers import run_app, start_app
from tests.model_samples import copy_repository

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture
def own_triton(served_repository):
    """A server of this test's own, to be killed, paused or restarted: the demo UNet alone, which is all these tests
    call (it starts in seconds, where sampler entries take tens of seconds on a busy machine)."""
    server = LocalTriton(served_repository, models=["meddpm_demo_cpu"]).start()
    yield server
    server.stop()


def phantom_condition(model: ServedModel, seed: int) -> np.ndarray:
    labels, _ = make_phantom(np.random.default_rng(seed), model.preset.image.grid, 6.0)
    return condition_channels(labels, model.preset)


def synthesise(denoiser, model, condition, seeds, progress=None) -> np.ndarray:
    """DDIM on consecutive `seeds`."""
    request = SamplingRequest(Scheduler.DDIM, STEPS, seeds[0], len(seeds))
    return sample(denoiser, condition, request, model.preset, progress=progress)


@pytest.fixture(scope="module")
def reference(model):
    """In-process ONNX Runtime results for the conditions and seeds the tests use."""
    denoiser = served_runtime(model)
    return lambda condition, seeds: synthesise(denoiser, model, condition, seeds)


def regions_mapped_by(pid: int) -> set[str]:
    """The shared memory files a process maps: its own regions, whatever other runs on this host hold."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[-1] for line in maps if "/dev/shm/meddpm_" in line}


def our_regions() -> list[str]:
    return glob.glob("/dev/shm/meddpm_*")


# --- the app through Triton ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def in_process_volumes(served_repository, mask_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("in_process")
    result = run_app(
        "-i",
        mask_folder,
        "-o",
        output,
        "-m",
        served_repository,
        "--model-name",
        "meddpm_demo",
        "--scheduler",
        "ddim",
        "--steps",
        STEPS,
        "--seed",
        7,
        "--samples",
        2,
        "--batch-size",
        2,
        "--precision",  # as the server computes: `auto` may be the demo's gated mixed precision in process
        "fp32",
    )
    assert result.returncode == 0, result.stderr
    return [nib.load(output / "head" / f"sample_{i}.nii.gz").get_fdata() for i in range(2)]


@pytest.mark.parametrize("transport", ["shm", "network"])
def test_app_through_triton_equals_in_process(
    triton, served_repository, mask_folder, in_process_volumes, transport, tmp_path
):
    result = run_app(
        "-i",
        mask_folder,
        "-o",
        tmp_path,
        "-m",
        served_repository,
        "--model-name",
        "meddpm_demo",
        "--scheduler",
        "ddim",
        "--steps",
        STEPS,
        "--seed",
        7,
        "--samples",
        2,
        "--batch-size",
        2,
        "--triton-transport",
        transport,
        env={"TRITON_SERVER_NETLOC": triton.url},
    )
    assert result.returncode == 0, result.stderr
    assert f"transport {transport}" in result.stderr
    for i, expected in enumerate(in_process_volumes):
        served = nib.load(tmp_path / "head" / f"sample_{i}.nii.gz").get_fdata()
        np.testing.assert_allclose(served, expected, atol=1e-5)
    assert not our_regions()
    verified = json.loads((tmp_path / "head" / "record.json").read_text())["model"]["sha256_verified"]
    manifest = find_model(served_repository, "meddpm_demo").manifest
    assert (
        verified[f"Triton model 'meddpm_demo_cpu' at {triton.url}, config parameter onnx_sha256"]
        == manifest.onnx.sha256
    )


def test_app_says_when_no_server_answers(served_repository, mask_folder, tmp_path):
    started = time.monotonic()
    result = run_app(
        "-i",
        mask_folder,
        "-o",
        tmp_path / "out",
        "-m",
        served_repository,
        "--model-name",
        "meddpm_demo",
        "--triton-retry-window",
        2,
        "--triton-server-netloc",
        f"localhost:{free_port()}",
    )
    assert result.returncode == ServerError.exit_code
    assert "not ready after 2 s" in result.stderr and "start the server" in result.stderr
    assert time.monotonic() - started < 300  # the app's start-up takes half a minute on a busy machine
    assert not (tmp_path / "out" / "head").exists()


def test_ctrl_c_stops_the_run_and_frees_shared_memory(triton, served_repository, mask_folder, tmp_path):
    app = start_app(
        "-i",
        mask_folder,
        "-o",
        tmp_path / "out",
        "-m",
        served_repository,
        "--model-name",
        "meddpm_demo",
        "--scheduler",
        "ddim",
        "--steps",
        200,
        env={"TRITON_SERVER_NETLOC": triton.url},
        stderr=subprocess.PIPE,
    )
    seen = []
    for line in app.stderr:
        seen.append(line)
        if "step 20/200" in line:  # logged at INFO (every tenth of the run)
            break
    regions = regions_mapped_by(app.pid)
    assert regions, "the run should be using shared memory"
    app.send_signal(signal.SIGINT)
    seen += app.stderr.readlines()
    assert app.wait(300) == 130, "".join(seen)
    assert not [region for region in regions if os.path.exists(region)]
    assert not grpcclient.InferenceServerClient(triton.url).get_system_shared_memory_status().regions
    assert not (tmp_path / "out" / "head").exists()


# --- the denoiser: batching, concurrency, limits ----------------------------------------------------------------


def test_batch_over_the_server_maximum_is_split(triton, model, reference):
    condition = phantom_condition(model, 1)
    seeds = list(range(6))  # the model serves at most 4 per request
    denoiser = TritonDenoiser(triton.url, model, transport="shm")
    np.testing.assert_allclose(synthesise(denoiser, model, condition, seeds), reference(condition, seeds), atol=1e-5)


def test_concurrent_runs_get_what_they_would_get_alone(triton, model, reference):
    client = grpcclient.InferenceServerClient(triton.url)

    def served_counts():
        stats = client.get_inference_statistics("meddpm_demo_cpu").model_stats[0]
        return stats.inference_count, stats.execution_count

    runs = {
        "a": (phantom_condition(model, 2), [10, 11], "shm"),
        "b": (phantom_condition(model, 3), [20], "network"),
        "c": (phantom_condition(model, 4), [30, 31, 32], "network"),
    }
    results, errors = {}, []

    def run(name, condition, seeds, transport):
        try:
            results[name] = synthesise(TritonDenoiser(triton.url, model, transport=transport), model, condition, seeds)
        except Exception as error:  # surfaced below
            errors.append(error)

    inferences, executions = served_counts()
    threads = [threading.Thread(target=run, args=(name, *args)) for name, args in runs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for name, (condition, seeds, _) in runs.items():
        np.testing.assert_allclose(results[name], reference(condition, seeds), atol=1e-5, err_msg=name)
    inferences, executions = (now - before for now, before in zip(served_counts(), (inferences, executions)))
    assert inferences == STEPS * 6
    print(f"server ran {inferences} samples in {executions} executions")


def test_message_limit_splits_the_batch_or_says_what_to_do(triton, model, reference):
    condition = phantom_condition(model, 5)
    per_sample = (2 * model.preset.out_channels + condition.shape[0]) * condition[0].nbytes
    denoiser = TritonDenoiser(triton.url, model, transport="network", max_message_bytes=per_sample + 100_000)
    np.testing.assert_allclose(synthesise(denoiser, model, condition, [1, 2]), reference(condition, [1, 2]), atol=1e-5)
    small = TritonDenoiser(triton.url, model, transport="network", max_message_bytes=per_sample // 2)
    with pytest.raises(ConfigurationError, match="over the limit.*--triton-transport shm"):
        synthesise(small, model, condition, [1])


def test_auto_transport_takes_shared_memory_only_on_this_host(triton, model):
    assert TritonDenoiser(triton.url, model).transport == "shm"
    assert is_this_host("127.0.0.1:8001") and is_this_host("localhost:8001")
    assert not is_this_host("192.0.2.10:8001")  # TEST-NET-1: never this machine


# --- faults ------------------------------------------------------------------------------------------------------


def test_a_model_for_another_preset_is_refused_naming_both(triton, model):
    with pytest.raises(
        ModelError, match=r"'noisy_image' is TYPE_FP32 \[1, 16, 16, 16\].*needs TYPE_FP32 \[1, 32, 32, 32\]"
    ):
        TritonDenoiser(triton.url, model, served_name="other_head_cpu")


def test_a_server_serving_another_export_is_refused_naming_both_hashes(triton, model):
    other_graph = dataclasses.replace(model.manifest.onnx, sha256="0" * 64)
    other = dataclasses.replace(model, manifest=dataclasses.replace(model.manifest, onnx=other_graph))
    with pytest.raises(
        ModelError,
        match=f"'meddpm_demo_cpu' at {triton.url} records onnx_sha256 "
        f"{model.manifest.onnx.sha256} in its config, but .*manifest.json "
        f"states {'0' * 64}: the server serves another export",
    ):
        TritonDenoiser(triton.url, other)


def test_a_config_named_unlike_its_folder_is_refused_naming_both(demo_repository, tmp_path):
    repository = copy_repository(demo_repository, tmp_path)
    config = repository / "meddpm_demo_cpu" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "meddpm_demo_cpu"', 'name: "meddpm_demo2_cpu"'))
    expected = (
        f"{config}: names the model 'meddpm_demo2_cpu', but its folder is 'meddpm_demo_cpu'.*rename the "
        f"folder back to 'meddpm_demo2_cpu', or export the model under the new name "
        f"\\(`python -m export --name meddpm_demo "
    )
    with pytest.raises(ModelError, match=expected):  # before the server starts, rather than its exit code
        LocalTriton(repository)
    with pytest.raises(ModelError, match=expected):  # the app, before any step (in process too)
        find_model(repository)


def test_an_unloaded_model_is_waited_for_then_reported(own_triton, model, reference):
    client = grpcclient.InferenceServerClient(own_triton.url)
    client.unload_model("meddpm_demo_cpu")
    with pytest.raises(
        ServerError,
        match="'meddpm_demo' or 'meddpm_demo_openvino' or 'meddpm_demo_cpu' not ready"
        ".*meddpm_demo_cpu (UNAVAILABLE|UNLOADING)",
    ):
        TritonDenoiser(own_triton.url, model, policy=RetryPolicy(window_s=1))
    client.load_model("meddpm_demo_cpu")

    condition = phantom_condition(model, 6)
    denoiser = TritonDenoiser(own_triton.url, model, policy=RetryPolicy(window_s=60))

    def unload_then_reload(done, total, elapsed):
        if done == 1:
            client.unload_model("meddpm_demo_cpu")
            threading.Timer(1.0, client.load_model, ["meddpm_demo_cpu"]).start()

    served = synthesise(denoiser, model, condition, [4], unload_then_reload)
    np.testing.assert_allclose(served, reference(condition, [4]), atol=1e-5)


@pytest.mark.parametrize("transport", ["shm", "network"])
def test_server_restarted_mid_run_the_run_goes_on_from_its_step(own_triton, model, reference, transport):
    condition = phantom_condition(model, 7)
    denoiser = TritonDenoiser(own_triton.url, model, transport=transport, policy=RetryPolicy(window_s=90))
    restarts = []

    def crash_then_restart(done, total, elapsed):
        if done == 2:
            own_triton.kill()
            restarts.append(threading.Timer(1.0, own_triton.start))
            restarts[-1].start()

    served = synthesise(denoiser, model, condition, [8, 9], crash_then_restart)
    restarts[0].join()
    np.testing.assert_allclose(served, reference(condition, [8, 9]), atol=1e-5)
    assert not our_regions()


def test_server_gone_for_good_is_a_bounded_clear_error(own_triton, model):
    denoiser = TritonDenoiser(own_triton.url, model, transport="shm", policy=RetryPolicy(window_s=3))

    def crash(done, total, elapsed):
        if done == 2:
            own_triton.kill()

    started = time.monotonic()
    with pytest.raises(ServerError, match="did not answer request .* for 3 s"):
        synthesise(denoiser, model, phantom_condition(model, 8), [1], crash)
    assert time.monotonic() - started < 120  # bounded by the 3 s window, with room for a busy machine
    assert not our_regions()


def test_a_server_that_stops_answering_hits_the_deadline(own_triton, model):
    denoiser = TritonDenoiser(own_triton.url, model, transport="network", policy=RetryPolicy(deadline_s=1, window_s=3))

    def freeze(done, total, elapsed):
        if done == 2:
            own_triton.process.send_signal(signal.SIGSTOP)

    try:
        with pytest.raises(ServerError, match="DEADLINE_EXCEEDED"):
            synthesise(denoiser, model, phantom_condition(model, 9), [1], freeze)
    finally:
        own_triton.process.send_signal(signal.SIGCONT)


def test_sigterm_stops_the_local_server_it_started_and_its_log_is_outside_the_repository(served_repository):
    grpc_port, http_port = free_port(), free_port()
    before = set(REPO.iterdir())
    command = [
        sys.executable,
        "-m",
        "harness.local_triton",
        "--repository",
        served_repository,
        "--grpc-port",
        grpc_port,
        "--http-port",
        http_port,
        "--models",
        "meddpm_demo_cpu",
    ]
    process = subprocess.Popen(
        list(map(str, command)), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        ready = process.stdout.readline()
        assert "Triton ready" in ready, ready + process.stderr.read()
        assert server_processes(grpc_port)
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 128 + signal.SIGTERM, process.stderr.read()
    finally:
        process.kill()
    assert server_processes(grpc_port) == []  # not orphaned, and the port is free again
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", grpc_port))
    log = Path(ready.split("; log ")[1].split(". Ctrl-C")[0])
    assert log.is_file() and not log.is_relative_to(REPO) and set(REPO.iterdir()) == before
