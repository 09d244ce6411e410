"""The sampling loop inside a real Triton server (<name>_sampler, decoupled, BLS to the UNet), over gRPC streaming."""

from __future__ import annotations

import dataclasses
import functools
import queue
import signal
import subprocess
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from harness.local_triton import LocalTriton
from meddpm.backends.triton_client.client import TritonDenoiser
from meddpm.backends.triton_client.options import RetryPolicy
from meddpm.backends.triton_client.server_loop import TritonServerLoop
from meddpm.errors import ConfigurationError, Interrupted, ModelError, ServerError
from meddpm.imaging.geometry import condition_channels
from meddpm.imaging.phantom_heads import make_phantom
from meddpm.model.served_model import ServedModel
from meddpm.sampling import sampler_files
from meddpm.sampling.loop import sample
from meddpm.sampling.request import SamplingRequest
from tests.conftest import edit_weights, served_runtime
from tests.helpers import concurrently, run_app, start_app
from tests.model_samples import copy_repository

pytestmark = pytest.mark.slow
STEPS = 4
UNET = "meddpm_demo_cpu"


def condition_of(model: ServedModel, seed: int) -> np.ndarray:
    labels, _ = make_phantom(np.random.default_rng(seed), model.preset.image.grid, 6.0)
    return condition_channels(labels, model.preset)


def server_loop(server: LocalTriton, model: ServedModel, **policy) -> TritonServerLoop:
    return TritonServerLoop(TritonDenoiser(server.url, model, transport="network", policy=RetryPolicy(**policy)))


def run(loop, model, condition, seeds, scheduler="ddim", steps=STEPS, progress=None, stop=None) -> np.ndarray:
    """`loop` on consecutive `seeds`."""
    request = SamplingRequest(scheduler, steps, seeds[0], len(seeds))
    return loop(condition, request, model.preset, progress=progress, stop=stop)


def unet_inferences(server: LocalTriton) -> int:
    stats = grpcclient.InferenceServerClient(server.url).get_inference_statistics(UNET).model_stats[0]
    return stats.inference_count


def settled_inferences(server: LocalTriton, quiet_s: float = 3.0, limit_s: float = 120.0) -> int:
    """The UNet's inference count once it has not changed for `quiet_s` (a busy server's last step may still be
    running when a loop is cancelled); fails if it keeps changing for `limit_s`."""
    count, since, started = unet_inferences(server), time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() - started < limit_s, "the server-side loop went on after the cancellation"
        time.sleep(0.5)
        if (now := unet_inferences(server)) != count:
            count, since = now, time.monotonic()
    return count


# ddpm and dpmpp2m-sde (the fast path) draw noise every step from the samples' generators
@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpmpp2m-sde"])
def test_server_loop_equals_client_loop_and_streams_progress(triton, model, scheduler):
    condition, seeds = condition_of(model, 1), [7, 8, 9, 10, 11]  # 5 samples: the UNet takes 4 per BLS request
    steps_seen = []
    served = run(
        server_loop(triton, model).sample,
        model,
        condition,
        seeds,
        scheduler,
        progress=lambda done, total, elapsed: steps_seen.append((done, total)),
    )
    local = run(functools.partial(sample, served_runtime(model)), model, condition, seeds, scheduler)
    np.testing.assert_allclose(served, local, atol=1e-5)
    assert steps_seen == [(i, STEPS) for i in range(1, STEPS + 1)]


def test_app_with_the_server_loop_equals_in_process(triton, demo_repository, mask_folder, tmp_path):
    common = [
        "-i",
        mask_folder / "head.nii.gz",
        "-m",
        demo_repository,
        "--scheduler",
        "ddim",
        "--steps",
        STEPS,
        "--seed",
        3,
        "--samples",
        3,
        "--batch-size",
        2,
        "--precision",  # as the server computes: `auto` may be the demo's gated mixed precision in process
        "fp32",
        "-l",
        "DEBUG",
    ]
    modes = {"in_process": ([], {}), "server": (["--triton-loop", "server"], {"TRITON_SERVER_NETLOC": triton.url})}
    runs = concurrently(  # two processes at once
        *(
            functools.partial(run_app, *common, "-o", tmp_path / mode, *extra, env=env, timeout=600)
            for mode, (extra, env) in modes.items()
        )
    )
    results = {}
    for mode, done in zip(modes, runs):
        assert done.returncode == 0, done.stderr[-3000:]
        results[mode] = (
            [nib.load(tmp_path / mode / "head" / f"sample_{i}.nii.gz").get_fdata() for i in range(3)],
            done.stderr,
        )
    for served, local in zip(results["server"][0], results["in_process"][0]):
        np.testing.assert_allclose(served, local, atol=1e-5)
    log = results["server"][1]
    assert "sampling loop on the server (meddpm_demo_sampler calling meddpm_demo_cpu)" in log
    assert f"head batch 2/2: step {STEPS}/{STEPS}" in log and "head batch 1/2: step 1/4" in log


def test_stop_cancels_the_server_loop_and_frees_the_instance(triton, model):
    loop = server_loop(triton, model)
    stop = threading.Event()
    before, started = unet_inferences(triton), time.monotonic()
    with pytest.raises(Interrupted, match="stopped at step 3 of 200; the server-side loop was cancelled"):
        run(
            loop.sample,
            model,
            condition_of(model, 2),
            [1],
            steps=200,
            stop=stop,
            progress=lambda done, total, elapsed: done == 2 and stop.set(),
        )
    assert time.monotonic() - started < 120
    after_cancel = settled_inferences(triton)  # the server sees the cancellation at its next step
    assert after_cancel - before < 10, "the server-side loop stopped within a few steps"
    condition = condition_of(model, 3)  # both sampler instances serve again
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(run(loop.sample, model, condition, [5]))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 2 and np.array_equal(results[0], results[1])


def test_ctrl_c_in_the_app_cancels_the_server_loop(triton, demo_repository, tmp_path):
    labels, _ = make_phantom(np.random.default_rng(8), (32, 32, 32), 6.0)
    nib.save(nib.Nifti1Image(labels, np.diag([6.0, 6.0, 6.0, 1.0])), tmp_path / "head.nii.gz")
    app = start_app(
        "-i",
        tmp_path / "head.nii.gz",
        "-o",
        tmp_path / "out",
        "-m",
        demo_repository,
        "--triton-loop",
        "server",
        "--scheduler",
        "ddim",
        "--steps",
        200,
        env={"TRITON_SERVER_NETLOC": triton.url},
        stderr=subprocess.PIPE,
    )
    seen = []
    for line in app.stderr:  # the server's progress, logged by the app at INFO every tenth of the run
        seen.append(line)
        if "step 20/200" in line:
            break
    app.send_signal(signal.SIGINT)
    seen += app.stderr.readlines()
    assert app.wait(300) == Interrupted.exit_code, "".join(seen)
    assert "the server-side loop was cancelled" in "".join(seen)
    settled_inferences(triton)
    assert not (tmp_path / "out" / "head").exists()


def test_bad_settings_come_back_as_configuration_errors(triton, model):
    loop = server_loop(triton, model)
    with pytest.raises(ConfigurationError, match="'euler' is not a scheduler; choose one of ddpm, ddim"):
        run(loop.sample, model, condition_of(model, 4), [1], scheduler="euler")
    # A request from another client that leaves out parameters, or names a model the sampler does not call
    events = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.url)
    client.start_stream(lambda result, error: events.put(error))
    condition = grpcclient.InferInput("condition", [2, 32, 32, 32], "FP32")
    condition.set_data_from_numpy(condition_of(model, 4))
    client.async_stream_infer("meddpm_demo_sampler", [condition], parameters={"scheduler": "ddim", "steps": 2})
    assert "request parameters seed, samples, unet_model are missing" in events.get(timeout=60).message()
    client.async_stream_infer(
        "meddpm_demo_sampler",
        [condition],
        parameters={"scheduler": "ddim", "steps": 2, "seed": 1, "samples": 1, "unet_model": "other"},
    )
    assert "choose one of meddpm_demo, meddpm_demo_openvino, meddpm_demo_cpu" in events.get(timeout=60).message()
    client.stop_stream()


def test_a_sampler_of_other_code_or_another_export_is_refused_naming_both_hashes(triton, model, monkeypatch):
    package = model.manifest.sampler_package
    assert package.sha256 == sampler_files.code_sha256()  # the server runs this app's own sampling code
    other_code = dataclasses.replace(package, sha256="0" * 64)
    other = dataclasses.replace(model, manifest=dataclasses.replace(model.manifest, sampler_package=other_code))
    with pytest.raises(
        ModelError,
        match=f"exported with the sampling code of meddpm-deploy {package.version} "
        f"\\(tree SHA-256 {'0' * 64}\\), and this app's differs \\({package.sha256}\\)",
    ):
        server_loop(triton, other)
    monkeypatch.setattr(sampler_files, "code_sha256", lambda: "0" * 64)  # an app of that code, against this server
    with pytest.raises(
        ModelError,
        match=f"'meddpm_demo_sampler' at {triton.url} records package_sha256 "
        f"{package.sha256} in its config, but .*states {'0' * 64}",
    ):
        server_loop(triton, other)


def test_the_server_refuses_to_load_files_changed_after_export(demo_repository, tmp_path):
    repository = copy_repository(demo_repository, tmp_path)
    edit_weights(repository / UNET / "1" / "model.onnx")
    with open(repository / "meddpm_demo_sampler" / "1" / "meddpm" / "sampling" / "loop.py", "a") as source:
        source.write("# edited after export\n")
    server = LocalTriton(repository)
    try:
        with pytest.raises(ServerError, match="exited with code"):
            server.start()
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "model.onnx: SHA-256" in log and "but config.pbtxt records onnx_sha256" in log
    assert "meddpm: tree SHA-256" in log and "but config.pbtxt records package_sha256" in log


@pytest.fixture(scope="module")
def fault_triton(demo_repository):
    """A server of these tests' own, to unload models from and to pause (each test leaves it serving)."""
    with LocalTriton(demo_repository) as server:
        yield server


def test_a_unet_lost_mid_loop_is_a_clear_error_and_the_sampler_serves_on(fault_triton, model):
    client = grpcclient.InferenceServerClient(fault_triton.url)
    loop = server_loop(fault_triton, model)

    def unload(done, total, elapsed):
        if done == 2:
            threading.Thread(target=client.unload_model, args=[UNET]).start()

    started = time.monotonic()
    with pytest.raises(ServerError, match=f"UNet model '{UNET}' failed inside the server-side loop"):
        run(loop.sample, model, condition_of(model, 5), [1], steps=200, progress=unload)
    assert time.monotonic() - started < 180  # failed at once, not after the 200 steps (minutes on a busy machine)
    client.load_model(UNET)
    condition = condition_of(model, 6)
    local = run(functools.partial(sample, served_runtime(model)), model, condition, [2])
    np.testing.assert_allclose(run(loop.sample, model, condition, [2]), local, atol=1e-5)


def test_an_unloaded_sampler_is_named_with_the_fix(fault_triton, model):
    client = grpcclient.InferenceServerClient(fault_triton.url)
    client.unload_model("meddpm_demo_sampler")
    try:
        with pytest.raises(ServerError, match="'meddpm_demo_sampler' is not ready.*--triton-loop client"):
            server_loop(fault_triton, model)
    finally:
        client.load_model("meddpm_demo_sampler")


def test_a_silent_server_ends_the_stream_at_the_deadline(fault_triton, model):
    loop = server_loop(fault_triton, model, deadline_s=10)  # a busy machine's step is far shorter than this

    def freeze(done, total, elapsed):
        if done == 2:
            fault_triton.process.send_signal(signal.SIGSTOP)

    started = time.monotonic()
    try:
        with pytest.raises(ServerError, match="sent nothing for 10 s after step 2 of 200; the request was cancelled"):
            run(loop.sample, model, condition_of(model, 7), [1], steps=200, progress=freeze)
    finally:
        fault_triton.process.send_signal(signal.SIGCONT)
    assert time.monotonic() - started < 120


def test_the_server_loop_without_a_server_is_a_configuration_error(demo_repository, mask_folder, tmp_path):
    done = run_app(
        "-i",
        mask_folder / "head.nii.gz",
        "-o",
        tmp_path / "out",
        "-m",
        demo_repository,
        "--triton-loop",
        "server",
        env={"TRITON_SERVER_NETLOC": None},
        timeout=300,
    )
    assert done.returncode == ConfigurationError.exit_code
    assert "--triton-loop server needs a Triton server: set TRITON_SERVER_NETLOC" in done.stderr
