"""Peak memory of one UNet step on the CPU, at full size, with ONNX Runtime and OpenVINO side by side.

    python -m benchmarks.step_memory [--preset whole-head] [--grids 64 96 128] [--batch 1]
                                     [--backends onnxruntime openvino]

The preset's UNet with random weights is exported once (the graph's spatial axes are dynamic); each grid and backend
is then run in a fresh process that loads the model and runs one step, and reports its peak resident memory (VmHWM),
its peak virtual size (VmPeak: what an address-space limit counts) and the step's seconds. The figures calibrate
the app's memory check (meddpm/imaging/memory.py): it prints the estimate beside each measurement, and each
backend's peak over the first one's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.random_weights import random_unet
from export import onnx_graph
from meddpm.backends.in_process import in_process_denoiser
from meddpm.backends.options import Backend
from meddpm.imaging.memory import step_memory_estimate
from meddpm.model.presets import Precision, get_preset
from meddpm.model.unet import ConditionalDenoiser


def export_random(preset_name: str, path: Path) -> None:
    preset = get_preset(preset_name)
    unet = random_unet(preset)
    onnx_graph.export_onnx(ConditionalDenoiser(unet).eval(), preset, path)


def one_step(onnx_path: str, preset_name: str, side: int, batch: int, backend: Backend) -> None:
    """Run in a fresh process: load the model, run one step, print the peak memory as JSON."""
    preset = get_preset(preset_name)
    denoiser = in_process_denoiser(Path(onnx_path), preset, backend, Precision.FP32)
    rng = np.random.default_rng(0)
    grid = (side,) * 3
    noisy = rng.standard_normal((batch, preset.out_channels, *grid), dtype=np.float32)
    condition = rng.standard_normal((batch, len(preset.condition.labels), *grid), dtype=np.float32)
    started = time.perf_counter()
    denoiser.predict(noisy, np.full((batch,), 125.0, dtype=np.float32), condition)
    seconds = time.perf_counter() - started
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    peaks = {f"{key}_mib": int(status[key].split()[0]) / 1024 for key in ("VmHWM", "VmPeak")}
    print(json.dumps({**peaks, "step_s": seconds}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="whole-head")
    parser.add_argument("--grids", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--backends", type=Backend, nargs="+", default=[Backend.ONNXRUNTIME, Backend.OPENVINO], choices=list(Backend)
    )
    parser.add_argument("--one-step", nargs=2, metavar=("ONNX", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_step:
        return one_step(args.one_step[0], args.preset, int(args.one_step[1]), args.batch, args.backends[0])
    preset = get_preset(args.preset)
    print(f"preset {args.preset}, batch {args.batch}, CPU, one step in a fresh process per grid and backend")
    print("| grid | backend | peak RSS MiB | peak virtual MiB | estimate MiB | RSS / first backend's | step s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = Path(folder) / "model.onnx"
        export_random(args.preset, onnx_path)
        for side in args.grids:
            first = None
            for backend in args.backends:
                command = ["-m", "benchmarks.step_memory", "--preset", args.preset, "--batch", str(args.batch)]
                command += ["--backends", backend, "--one-step", str(onnx_path), str(side)]
                answer = subprocess.run([sys.executable, *command], capture_output=True, text=True, check=True)
                figures = json.loads(answer.stdout.strip().splitlines()[-1])
                rss, first = figures["VmHWM_mib"], first or figures["VmHWM_mib"]
                weights = onnx_path.stat().st_size
                estimate = step_memory_estimate(preset, (side,) * 3, args.batch, weights, backend) / 2**20
                print(
                    f"| {side}³ | {backend} | {rss:.0f} | {figures['VmPeak_mib']:.0f} | {estimate:.0f} | "
                    f"{rss / first:.2f} | {figures['step_s']:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
