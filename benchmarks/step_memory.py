"""Peak resident memory of one UNet step with ONNX Runtime on the CPU, at full size.

    python -m benchmarks.step_memory [--preset whole-head] [--grids 64 96 128] [--batch 1]

The preset's UNet with random weights is exported once (the graph's spatial axes are dynamic); each grid is then
run in a fresh process that loads the session and runs one step, and reports its peak resident memory (VmHWM)
and the step's seconds. The figures calibrate the app's memory check (meddpm/memory.py): it prints the
estimate beside each measurement.
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
from meddpm.imaging.memory import step_memory_estimate
from meddpm.model.presets import get_preset
from meddpm.model.unet import ConditionalDenoiser


def export_random(preset_name: str, path: Path) -> None:
    preset = get_preset(preset_name)
    unet = random_unet(preset)
    onnx_graph.export_onnx(ConditionalDenoiser(unet).eval(), preset, path)


def one_step(onnx_path: str, preset_name: str, side: int, batch: int) -> None:
    """Run in a fresh process: load the session, run one step, print the peak memory as JSON."""
    from meddpm.backends.onnxruntime_denoiser import OnnxRuntimeDenoiser

    preset = get_preset(preset_name)
    denoiser = OnnxRuntimeDenoiser(Path(onnx_path))
    rng = np.random.default_rng(0)
    grid = (side,) * 3
    noisy = rng.standard_normal((batch, preset.out_channels, *grid), dtype=np.float32)
    condition = rng.standard_normal((batch, len(preset.condition.labels), *grid), dtype=np.float32)
    started = time.perf_counter()
    denoiser.predict(noisy, np.full((batch,), 125.0, dtype=np.float32), condition)
    seconds = time.perf_counter() - started
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    print(json.dumps({"peak_rss_mib": int(status["VmHWM"].split()[0]) / 1024, "step_s": seconds}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="whole-head")
    parser.add_argument("--grids", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--one-step", nargs=2, metavar=("ONNX", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_step:
        return one_step(args.one_step[0], args.preset, int(args.one_step[1]), args.batch)
    preset = get_preset(args.preset)
    print(f"preset {args.preset}, batch {args.batch}, ONNX Runtime CPU, one step in a fresh process per grid")
    print("| grid | peak RSS MiB (measured) | estimate MiB (meddpm/memory.py) | step s |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = Path(folder) / "model.onnx"
        export_random(args.preset, onnx_path)
        for side in args.grids:
            answer = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.step_memory",
                    "--preset",
                    args.preset,
                    "--batch",
                    str(args.batch),
                    "--one-step",
                    str(onnx_path),
                    str(side),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            figures = json.loads(answer.stdout.strip().splitlines()[-1])
            estimate = step_memory_estimate(preset, (side,) * 3, args.batch, onnx_path.stat().st_size) / 2**20
            print(f"| {side}³ | {figures['peak_rss_mib']:.0f} | {estimate:.0f} | {figures['step_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
