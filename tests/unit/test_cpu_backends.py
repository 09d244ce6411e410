"""The in-process runtimes behind the one denoiser interface: OpenVINO against ONNX Runtime, and what `auto` picks."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from meddpm.backends.in_process import in_process_denoiser
from meddpm.backends.onnxruntime_denoiser import OnnxRuntimeDenoiser, cuda_present
from meddpm.backends.openvino_denoiser import OpenVinoDenoiser, native_bf16
from meddpm.backends.options import Backend, step_precision
from meddpm.errors import ConfigurationError
from meddpm.model.presets import Precision, Preset, Scheduler
from meddpm.model.unet import ConditionalDenoiser, build_unet
from meddpm.sampling.loop import sample
from meddpm.sampling.request import SamplingRequest
from tests.conftest import randomise


@pytest.fixture(scope="module")
def tiny_graph(presets, tmp_path_factory):
    from export.onnx_graph import export_onnx

    preset = presets["tiny"]
    path = tmp_path_factory.mktemp("graph") / "model.onnx"
    export_onnx(ConditionalDenoiser(randomise(build_unet(preset), seed=4, scale=0.1)).eval(), preset, path)
    return preset, path


def inputs(preset, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    grid = tuple(preset.image.grid)
    noisy = rng.standard_normal((batch, preset.out_channels, *grid)).astype(np.float32)
    condition = np.sign(rng.standard_normal((batch, preset.condition_channels, *grid))).astype(np.float32)
    return noisy, condition


def test_openvino_fp32_computes_what_onnxruntime_computes(tiny_graph):
    preset, path = tiny_graph
    noisy, condition = inputs(preset)
    openvino, onnxruntime = OpenVinoDenoiser(path, Precision.FP32, 250), OnnxRuntimeDenoiser(path)
    for t in (0.0, 124.5, 249.0):
        timestep = np.full((2,), t, np.float32)
        reference = onnxruntime.predict(noisy, timestep, condition)
        error = np.abs(openvino.predict(noisy, timestep, condition) - reference).max() / np.abs(reference).max()
        assert error < 1e-4, (t, error)
    for samples in (1, 2):  # one sample: the loop's condition is a read-only view
        request = SamplingRequest(Scheduler.DPMPP2M_SDE, 6, seed=3, samples=samples)
        volumes = [sample(d, condition[0], request, preset) for d in (openvino, onnxruntime)]
        assert np.abs(volumes[0] - volumes[1]).max() < 1e-3


def test_reduced_precision_runs_only_where_the_cpu_has_native_bf16(tiny_graph):
    preset, path = tiny_graph
    if not native_bf16():
        for precision in (Precision.BF16, Precision.MIXED):
            with pytest.raises(ConfigurationError, match=f"--precision {precision} needs a CPU with native BF16"):
                OpenVinoDenoiser(path, precision, 250)
        return
    noisy, condition = inputs(preset)
    mixed = OpenVinoDenoiser(path, Precision.MIXED, 250)
    steps = [step_precision(Precision.MIXED, t, 250) for t in (249.0, 200.0, 199.0, 0.0)]
    assert steps == [Precision.FP32] * 2 + [Precision.BF16] * 2
    reference = OnnxRuntimeDenoiser(path).predict(noisy, np.full((2,), 10.0, np.float32), condition)
    reduced = mixed.predict(noisy, np.full((2,), 10.0, np.float32), condition)
    assert np.abs(reduced - reference).max() / np.abs(reference).max() < 5e-2  # BF16: 8 bits of mantissa


def test_auto_is_openvino_fp32_on_a_cpu_and_onnxruntime_refuses_reduced_precision(tiny_graph):
    preset, path = tiny_graph
    chosen = in_process_denoiser(path, preset, Backend.AUTO, Precision.AUTO)
    assert chosen.name == ("onnxruntime" if cuda_present() else "openvino (fp32)")
    with pytest.raises(ConfigurationError, match="ONNX Runtime runs the exported graph in FP32 only"):
        in_process_denoiser(path, preset, Backend.ONNXRUNTIME, Precision.BF16)


def test_auto_precision_is_the_gated_one_only_where_openvino_has_native_bf16(tiny_graph):
    preset, path = tiny_graph
    gated = dataclasses.replace(preset, gated_precision=Precision.MIXED)
    on_cpu = in_process_denoiser(path, gated, Backend.OPENVINO, Precision.AUTO)
    assert on_cpu.name == ("openvino (mixed)" if native_bf16() else "openvino (fp32)")
    assert in_process_denoiser(path, gated, Backend.ONNXRUNTIME, Precision.AUTO).name == "onnxruntime"
    assert in_process_denoiser(path, gated, Backend.OPENVINO, Precision.FP32).name == "openvino (fp32)"


def test_a_presets_gated_precision_is_read_kept_in_the_manifest_and_never_auto(presets):
    table = {**presets["tiny"].to_dict(), "gated_precision": "mixed"}
    preset = Preset.from_dict("gated", table)
    assert preset.gated_precision == Precision.MIXED
    assert Preset.from_dict("gated", json.loads(json.dumps(preset.to_dict()))) == preset  # the manifest's copy
    assert presets["tiny"].gated_precision == Precision.FP32  # a table that does not say: no gate passed
    with pytest.raises(ConfigurationError, match="gated_precision is fp32, bf16 or mixed"):
        Preset.from_dict("gated", {**table, "gated_precision": "auto"})
    with pytest.raises(ConfigurationError, match="gated_precision"):
        Preset.from_dict("gated", {**table, "gated_precision": "fp16"})
