"""The in-process CPU runtimes side by side, in one run: ONNX Runtime FP32, OpenVINO FP32 and BF16, and PyTorch's
BF16 autocast (oneDNN), the peer a user would try first.

    python -m benchmarks.cpu_backends --cases demo:32 demo:64 whole-head:64 whole-head:128 --calls 3

For each case (preset and grid side) the graph is exported once (the demo checkpoint; released presets with random
weights), then every variant is timed on the same inputs, the variants taking turns call by call so that machine
noise falls on all alike (a warm-up call each first, not counted). Printed per variant: the median seconds per UNet
call (batch 1), the TFLOP/s it achieves (torch's FlopCounter counts a call, on the meta device), the fraction of this
CPU's peak at that precision, the relative error against ONNX Runtime FP32, and what a fast-path volume (20 calls)
and a DDPM-250 volume cost in UNet calls alone. A variant this CPU cannot run natively (BF16 without AMX or
AVX512-BF16) is listed with the reason instead.

The peak: cores x clock x FLOP per cycle and core of the widest unit the CPU has for that precision (AMX BF16:
1024 multiply-adds a cycle, 2048 FLOP; AVX512-BF16: 2 units x 32 pairs x 2, 128; AVX-512 FP32: 2 x 16 x 2, 64;
AVX2 FP32: 2 x 8 x 2, 32), the clock the highest `cpu MHz` of /proc/cpuinfo. That is a nominal peak, not a bound:
in a virtual machine `cpu MHz` is the nominal clock and the cores may run above it (turbo), and the count is of a
direct convolution's FLOPs, which a runtime may undercut (a Winograd-style algorithm does fewer multiplications),
so a fraction above 100% can be measured; such rows are flagged and printed with the reason.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.demo_grid import demo_at_grid
from benchmarks.random_weights import random_unet
from export.onnx_graph import export_onnx
from meddpm.model.checkpoint import load_checkpoint
from meddpm.model.presets import Preset, get_preset
from meddpm.model.tensors import CONDITION, NOISY_IMAGE, PREDICTED_NOISE, TIMESTEP
from meddpm.model.unet import ConditionalDenoiser, build_unet

FAST_PATH_CALLS, DDPM_CALLS = 20, 250
FLOP_PER_CYCLE = {"amx_bf16": 2048, "avx512_bf16": 128, "avx512f": 64, "avx2": 32}  # per core, widest unit first
Call = Callable[[], np.ndarray]


def cpu_peak(bf16: bool) -> tuple[float, str]:
    """FLOP/s peak of this process's cores at BF16 or FP32, and how it was derived."""
    text = Path("/proc/cpuinfo").read_text()
    flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split(":")[1].split())
    units = ["amx_bf16", "avx512_bf16"] if bf16 else ["avx512f", "avx2"]
    unit = next((u for u in units if u in flags), None)
    if unit is None:
        return float("nan"), f"no {'BF16' if bf16 else 'FP32 vector'} unit"
    mhz = max(float(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu MHz"))
    cores = len(os.sched_getaffinity(0))
    return cores * mhz * 1e6 * FLOP_PER_CYCLE[
        unit
    ], f"{cores} cores x {mhz / 1000:.2f} GHz x {FLOP_PER_CYCLE[unit]} ({unit})"


def flops(preset: Preset, side: int) -> float:
    with torch.device("meta"):
        model = ConditionalDenoiser(build_unet(preset))
        shapes = ((1, preset.out_channels, side, side, side), (1, preset.condition_channels, side, side, side), (1,))
        with FlopCounterMode(display=False) as counter:
            model(*(torch.empty(shape) for shape in shapes))
    return float(counter.get_total_flops())


def case_model(name: str, side: int, folder: Path) -> tuple[Preset, ConditionalDenoiser, Path]:
    """The case's preset, PyTorch model and exported graph (dynamic grid)."""
    if name == "demo":
        served = demo_at_grid(side, folder)
        unet = load_checkpoint(
            Path(__file__).resolve().parents[1] / "models/demo/model_demo.pt", get_preset("demo")
        ).unet
        return served.preset, ConditionalDenoiser(unet).eval(), served.onnx_path
    preset = get_preset(name)
    model = ConditionalDenoiser(random_unet(preset)).eval()
    path = folder / f"{name}.onnx"
    export_onnx(model, preset, path)
    return preset, model, path


def variants(model: ConditionalDenoiser, path: Path, feed: dict[str, np.ndarray]) -> dict[str, Call | str]:
    """Each variant's call on `feed`, or why it cannot run here."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    found: dict[str, Call | str] = {"onnxruntime fp32": lambda: session.run([PREDICTED_NOISE], feed)[0]}
    core = ov.Core()
    native_bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    graph = core.read_model(str(path))
    graph.reshape({name: list(array.shape) for name, array in feed.items()})
    for precision, hint in (("fp32", "f32"), ("bf16", "bf16")):
        if precision == "bf16" and not native_bf16:
            found["openvino bf16"] = "no native BF16 on this CPU (OpenVINO would not run it as BF16)"
            continue
        started = time.monotonic()
        compiled = core.compile_model(graph, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint})
        print(f"  openvino {precision}: compiled in {time.monotonic() - started:.1f} s")
        request = compiled.create_infer_request()

        def call(request=request) -> np.ndarray:
            request.infer(feed)
            return request.get_tensor(PREDICTED_NOISE).data.copy()

        found[f"openvino {precision}"] = call
    tensors = [torch.from_numpy(feed[name]) for name in (NOISY_IMAGE, CONDITION, TIMESTEP)]

    @torch.no_grad()
    def autocast_bf16() -> np.ndarray:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(*tensors).float().numpy()

    found["torch bf16 autocast"] = (
        autocast_bf16 if native_bf16 else "no native BF16 on this CPU: oneDNN emulates it, far slower than FP32"
    )
    return found


def run_case(name: str, side: int, calls: int, folder: Path) -> list[dict]:
    preset, model, path = case_model(name, side, folder)
    rng = np.random.default_rng(0)
    feed = {
        NOISY_IMAGE: rng.standard_normal((1, preset.out_channels, side, side, side)).astype(np.float32),
        CONDITION: np.sign(rng.standard_normal((1, preset.condition_channels, side, side, side))).astype(np.float32),
        TIMESTEP: np.array([200.0], np.float32),
    }
    found = variants(model, path, feed)
    runnable = {key: call for key, call in found.items() if callable(call)}
    outputs = {key: call() for key, call in runnable.items()}  # warm-up, and the outputs compared
    times: dict[str, list[float]] = {key: [] for key in runnable}
    for _ in range(calls):
        for key, call in runnable.items():
            started = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - started)
    reference = outputs["onnxruntime fp32"]
    work = flops(preset, side)
    rows = []
    for key, call in found.items():
        if not callable(call):
            rows.append({"case": f"{name} {side}^3", "variant": key, "why_not": call})
            continue
        seconds = statistics.median(times[key])
        peak, _ = cpu_peak("bf16" in key)
        error = float(np.abs(outputs[key] - reference).max() / np.abs(reference).max())
        rows.append({"case": f"{name} {side}^3", "variant": key, "s_per_call": seconds, "tflops": work / seconds / 1e12,
                     "peak_fraction": work / seconds / peak, "max_rel_error": error})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["demo:32", "demo:64", "whole-head:64"],
                        help="PRESET:SIDE, e.g. whole-head:128")  # fmt: skip
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args(argv)
    for bf16 in (False, True):
        print(f"{'BF16' if bf16 else 'FP32'} peak: {cpu_peak(bf16)[1]}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="meddpm-cpu-backends-") as work:
        for case in args.cases:
            name, side = case.split(":")
            print(f"{name} at {side}^3:")
            rows += run_case(name, int(side), args.calls, Path(work))
    print("| case | variant | s per call | TFLOP/s | of peak | max rel. error vs ORT FP32 | fast path (20 calls) s "
          "| DDPM-250 s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "why_not" in row:
            print(f"| {row['case']} | {row['variant']} | - | - | - | - | {row['why_not']} | |")
            continue
        flag = " (above the nominal peak*)" if row["peak_fraction"] > 1 else ""
        print(f"| {row['case']} | {row['variant']} | {row['s_per_call']:.3f} | {row['tflops']:.3f} | "
              f"{row['peak_fraction']:.1%}{flag} | {row['max_rel_error']:.1e} | "
              f"{FAST_PATH_CALLS * row['s_per_call']:.1f} | {DDPM_CALLS * row['s_per_call']:.0f} |")  # fmt: skip
    if any(row.get("peak_fraction", 0) > 1 for row in rows):
        print("* above cores x nominal clock x the unit's FLOP per cycle: the cores ran above /proc/cpuinfo's clock, "
              "or the runtime computed fewer FLOPs than a direct convolution; read it as the nominal "
              "peak's multiple, not as efficiency")  # fmt: skip


if __name__ == "__main__":
    main()
