"""The benchmark commands run end to end on a small grid (smoke runs: their figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.local_triton import DEFAULT_VENV
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def run_module(*args):
    result = subprocess.run(
        [sys.executable, "-m", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_sampling_loop_benchmark_runs_every_loop(tmp_path):
    if not (DEFAULT_VENV / "bin" / "python").exists():
        pytest.fail(f"{DEFAULT_VENV} is missing: run scripts/setup_triton.sh (scripts/test.sh does)")
    out = run_module(
        "benchmarks.sampling_loop", "--grids", 16, "--steps", 2, "--repeats", 1, "--json", tmp_path / "loop.json"
    )
    figures = json.loads((tmp_path / "loop.json").read_text())["results"][0]["backends"]
    assert set(figures) == {
        "reference",
        "onnxruntime-stock",
        "onnxruntime",
        "openvino",
        "triton-network",
        "triton-shm",
        "triton-server-loop",
    }
    assert figures["onnxruntime-stock"]["max_abs_diff_vs_onnxruntime"] == 0.0  # tuning changed no number
    for name in ("triton-network", "triton-shm", "triton-server-loop"):  # one loop, one image, wherever it runs
        assert figures[name]["max_abs_diff_vs_openvino"] < 1e-5, name  # the runtime the local Triton serves with
    assert figures["openvino"]["max_abs_diff_vs_onnxruntime"] < 1e-2  # another runtime: its own round-off
    assert figures["triton-shm"]["bytes_per_step"] < figures["triton-network"]["bytes_per_step"]
    assert figures["triton-server-loop"]["bytes_per_volume"] < figures["triton-network"]["bytes_per_volume"]
    assert "| 16³ | triton-shm |" in out


def test_gpu_benchmark_runs_its_cpu_variants(tmp_path):
    run_module(
        "benchmarks.gpu_unet",
        "--device",
        "cpu",
        "--preset",
        "demo",
        "--grid",
        16,
        "--repeats",
        1,
        "--variants",
        "fp32",
        "channels-last",
        "--json",
        tmp_path / "gpu.json",
    )
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp32", "channels-last"]
    assert rows[1]["max_rel_error_vs_fp32"] < 1e-5


def test_onnxruntime_options_benchmark_compares_every_variant_with_stock(tmp_path):
    out = run_module(
        "benchmarks.onnxruntime_options", "--grids", 16, "--calls", 1, "--rounds", 1, "--json", tmp_path / "ort.json"
    )
    variants = json.loads((tmp_path / "ort.json").read_text())["results"][0]["variants"]
    assert list(variants) == ["stock", "threads-1", "threads-2", "no-spinning", "extended", "io-binding"]
    assert variants["stock"]["ratio_vs_stock"] == 1.0
    assert variants["io-binding"]["max_abs_diff_vs_first"] < 1e-5  # same graph, same noise
    assert "| 16³ | io-binding |" in out


def test_quality_benchmark_scores_fast_schedulers_against_ddpm250(demo_repository, tmp_path):
    out = run_module(
        "benchmarks.quality",
        "--repository",
        demo_repository,
        "--masks",
        1,
        "--schedulers",
        "dpmpp2m-sde",
        "--steps",
        3,
        "--json",
        tmp_path / "quality.json",
    )
    results = json.loads((tmp_path / "quality.json").read_text())
    runs = [(r["scheduler"], r["steps"], r["unet_calls"]) for r in results["runs"]]
    assert runs == [("ddpm", 250, 250), ("dpmpp2m-sde", 3, 3)]  # the phantom model's preset has no mask prior
    fast = results["runs"][1]
    assert fast["vs_ddpm250"]["brain"]["n"] == 2 and 0.0 <= fast["dice_brain"]["mean"] <= 1.0
    assert results["ground_truth_ceiling"]["brain"]["mean"] > 0.9  # the segmentation reads phantoms back
    assert fast["intensity_distance"]["n"] == 2 and 0.0 < fast["intensity_distance"]["mean"] < 1.0
    assert "| ground-truth images |" in out and "Fewest steps within 0.02 of DDPM-250" in out


def test_precision_gate_runs_on_the_bf16_emulation_on_any_cpu(demo_repository, tmp_path):
    """The gate's smoke test on the emulation, which any CPU runs: its per-call error is BF16's (about 5e-3, as
    native BF16 measured), and each reduced precision is paired with FP32 from the same noise."""
    run_module(
        "benchmarks.precision_gate",
        *("--repository", demo_repository, "--bf16", "emulated", "--masks", 1, "--per-call-grid", 0),
        *("--runs", "dpmpp2m-sde:3", "--json", tmp_path / "gate.json"),
    )
    result = json.loads((tmp_path / "gate.json").read_text())
    errors = result["per_call"]["meddpm_demo"]["emulated vs fp32"]
    assert all(1e-3 < error < 2e-2 for error in errors.values()), errors
    assert [row["precision"] for row in result["runs"]] == ["fp32", "bf16", "mixed"]
    assert all(row["vs_fp32"]["brain"]["n"] == 2 for row in result["runs"][1:])
    assert result["gated_precision"] in ("fp32", "bf16", "mixed")


def test_step_math_benchmark_times_every_scheduler(tmp_path):
    run_module("benchmarks.step_math", "--grid", 16, "--steps", 3, "--json", tmp_path / "math.json")
    rows = json.loads((tmp_path / "math.json").read_text())["rows"]
    assert [r["scheduler"] for r in rows] == ["ddpm", "ddim", "dpmpp2m", "deis", "dpmpp2m-sde"]
    assert all(r["step_ms"] > 0 for r in rows)


def test_mask_memory_benchmark_measures_a_run_beside_its_estimate(demo_repository):
    out = run_module("benchmarks.mask_memory", "--repository", demo_repository, "--cases", "32:12:2")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 32³ | 12 | 64x64x64 | 2 |")]
    assert [row[5].strip() for row in rows] == ["onnxruntime", "openvino"]  # each runtime in a process of its own
    for row in rows:
        measured, estimate = float(row[6]), float(row[8])
        assert 0 < measured <= estimate


def test_cpu_backends_benchmark_compares_every_runtime():
    out = run_module("benchmarks.cpu_backends", "--cases", "demo:16", "--calls", 1)
    rows = [line for line in out.splitlines() if line.startswith("| demo 16^3 |")]
    assert [row.split(" | ")[1] for row in rows] == [
        "onnxruntime fp32", "openvino fp32", "openvino bf16", "torch bf16 autocast"
    ]  # fmt: skip
    openvino_fp32 = rows[1].split(" | ")
    assert float(openvino_fp32[5]) < 1e-4  # the same graph computed alike


def test_full_size_benchmark_runs_the_whole_head_architecture_through_the_app_small(triton_venv, tmp_path):
    """The full-size benchmark's smoke test: the whole-head architecture at 32^3 (random weights, exported), the
    app in process and through Triton's server-side loop, one volume each, equal on the mask's grid."""
    out = run_module(
        "benchmarks.full_size",
        *("--grid", 32, "--steps", 2, "--modes", "in-process", "triton-server-loop"),
        *("--out", tmp_path / "runs", "--json", tmp_path / "full.json"),
    )
    result = json.loads((tmp_path / "full.json").read_text())
    runs = {run["mode"]: run for run in result["runs"]}
    assert set(runs) == {"in-process", "in-process-again", "triton-server-loop"}, out
    assert runs["triton-server-loop"]["max_abs_diff_vs_first"] < 1e-5  # one loop and one runtime, wherever it runs
    for run in runs.values():
        assert 0 < run["first_step_s"] < run["wall_s"] and run["per_step_s"] > 0
        assert run["app_peak_mib"] > 0 and run["estimate_mib"] > 0
    assert runs["triton-server-loop"]["server_peak_mib"] > 0 and "| triton-server-loop |" in out
    repository = run_module("benchmarks.full_size", "--grid", 32, "--export-to", tmp_path / "map").split()[-1]
    assert (Path(repository) / "meddpm_full" / "1" / "model.onnx").is_file()  # what map_check.sh --full-size packages
