"""Peak memory of the app synthesising one mask, beside the estimate the app checks it with, per backend.

    python -m benchmarks.mask_memory --repository model_repository [--cases 32:6:1 256:0.75:8 32:48:1 ...]
                                     [--backends onnxruntime openvino]

Each case SIDE:VOXEL_MM:SAMPLES is a mask of SIDE³ voxels of VOXEL_MM (an ellipsoid head: brain and a tumour, always
inside the model's field of view), synthesised by the app (DDIM, 2 steps, in process) with each backend in a fresh
process that reports its peak resident memory (VmHWM) and peak virtual size (VmPeak: what an address-space limit
counts). The figures calibrate the app's per-mask check (meddpm/imaging/memory.py: mask_memory_estimate): it prints
the estimate beside each measurement. OMP_NUM_THREADS=1 measures one torch thread, on which MONAI's smoothing costs
more.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from meddpm.imaging.geometry import ModelGrid
from meddpm.imaging.memory import mask_memory_estimate
from meddpm.model.served_model import find_model

DEFAULT_CASES = ("32:6:1", "128:1.5:1", "256:0.75:1", "256:0.75:8", "256:0.75:30", "32:24:1", "32:48:1", "24:64:1")


def head_mask(side: int, voxel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels, affine): an ellipsoid brain (label 1, radii 70/85/75 mm) with a tumour (label 2, 20 mm) in it."""
    axis = (np.arange(side) - (side - 1) / 2) * voxel_mm
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij", sparse=True)
    labels = ((x / 70) ** 2 + (y / 85) ** 2 + (z / 75) ** 2 < 1).astype(np.uint8)
    labels[(x - 25) ** 2 + (y - 20) ** 2 + z**2 < 20**2] = 2
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = -(side - 1) / 2 * voxel_mm
    return labels, affine


def one_case(repository: str, side: int, voxel_mm: float, samples: int, formats: str, backend: str) -> None:
    """Run in a fresh process: the app on one mask; print its peak memory as JSON."""
    from app.app import main as app_main

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "head.nii.gz"
        nib.save(nib.Nifti1Image(*head_mask(side, voxel_mm)), path)
        started = time.perf_counter()
        code = app_main(
            [
                "app",
                "-i",
                str(path),
                "-o",
                str(Path(folder) / "out"),
                "-m",
                repository,
                "--scheduler",
                "ddim",
                "--steps",
                "2",
                "--seed",
                "0",
                "--samples",
                str(samples),
                "--output-format",
                formats,
                "--backend",
                backend,
            ]
        )
        seconds = time.perf_counter() - started
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    peaks = {f"{key}_mib": int(status[key].split()[0]) / 1024 for key in ("VmHWM", "VmPeak")}
    print(json.dumps({"exit_code": code, **peaks, "seconds": seconds}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mask_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="SIDE:VOXEL_MM:SAMPLES")
    parser.add_argument("--output-format", default="nifti", help="as the app's --output-format")
    parser.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"], help="as the app's --backend")
    parser.add_argument("--one-case", metavar="CASE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_case:
        side, voxel_mm, samples = args.one_case.split(":")
        case = (int(side), float(voxel_mm), int(samples))
        return one_case(args.repository, *case, args.output_format, args.backends[0])
    model = find_model(Path(args.repository))
    weights = model.onnx_path.stat().st_size
    print(f"model {model.name}, output {args.output_format}, DDIM 2 steps in process, one fresh process per case")
    print(
        "| mask | voxel mm | resampled to | samples | backend | peak RSS MiB | peak virtual MiB | estimate MiB "
        "| estimate / measured | RSS / first backend's | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        side, voxel_mm, samples = case.split(":")
        grid = ModelGrid((int(side),) * 3, head_mask(2, float(voxel_mm))[1], model.preset)
        first = None
        for backend in args.backends:
            command = ["-m", "benchmarks.mask_memory", "--repository", args.repository, "--output-format"]
            command += [args.output_format, "--backends", backend, "--one-case", case]
            answer = subprocess.run([sys.executable, *command], capture_output=True, text=True, check=True)
            figures = json.loads(answer.stdout.strip().splitlines()[-1])
            if figures["exit_code"] != 0:
                raise SystemExit(f"case {case}: the app exited with {figures['exit_code']}:\n{answer.stderr[-2000:]}")
            formats = tuple(args.output_format.split(","))
            estimate = mask_memory_estimate(grid, int(samples), 1, weights, formats, backend) / 2**20
            rss, first = figures["VmHWM_mib"], first or figures["VmHWM_mib"]
            print(
                f"| {side}³ | {voxel_mm} | {'x'.join(map(str, grid.resampled_shape))} | {samples} | {backend} | "
                f"{rss:.0f} | {figures['VmPeak_mib']:.0f} | {estimate:.0f} | {estimate / rss:.2f} | "
                f"{rss / first:.2f} | {figures['seconds']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
