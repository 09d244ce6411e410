"""The released whole-head architecture end to end through the app, on whatever CPU this is.

    python -m benchmarks.full_size [--grid 128] [--steps 5] [--modes ...] [--out build/full-size] [--json FILE]

Builds the whole-head UNet with random weights, saves it in Med-DDPM's `ema` checkpoint layout, exports it with
`python -m export` (timed, its peak memory read), then runs the app on the Med-DDPM sample mask
(tests/data/whole_head_mask_sample_0.nii.gz) with the fast path's scheduler, one process per mode:

- in-process: `--backend auto` (OpenVINO on a CPU), FP32; then again, to see what a second start costs;
- in-process-bf16, in-process-mixed: `--precision bf16` / `mixed`, only where the CPU has native BF16;
- triton-shm: the app's loop against the local Triton server (harness/local_triton.py) over shared memory;
- triton-server-loop: the loop inside that server.

Per mode: wall time, time to the first step (start-up, model load and hash, compile), seconds per step after the
first (from the app's progress lines), the app's peak resident memory beside the per-mask estimate the app checks it
against (plus the server's for Triton), and the largest difference of its volume to the first mode's, on the mask's
grid. A run of `--steps` steps stands for the fast path's 20; 20 steps and DDPM-250 are estimated from the per-step
time, not run.
`--grid 32` runs the same architecture small (a smoke test; CI runs it). `--export-to DIR` only builds and exports
the model into DIR/repository and prints that path (scripts/map_check.sh --full-size packages it into the MAP).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from benchmarks.app_runs import FIRST_STEP, TimedRun, cpu_model, timed_run
from benchmarks.demo_grid import preset_at_grid
from benchmarks.random_weights import random_unet
from benchmarks.sampling_loop import process_tree
from harness.local_triton import LocalTriton
from meddpm.backends.openvino_denoiser import native_bf16
from meddpm.backends.options import step_precision
from meddpm.imaging.formats import OutputFormat
from meddpm.imaging.geometry import ModelGrid
from meddpm.imaging.masks import read_mask
from meddpm.imaging.memory import mask_memory_estimate
from meddpm.model.checkpoint import save_meddpm_checkpoint
from meddpm.model.presets import Precision, load_presets
from meddpm.model.served_model import ServedModel, find_model
from meddpm.sampling.schedulers import make_scheduler

REPO = Path(__file__).resolve().parents[1]
MASK = REPO / "tests" / "data" / "whole_head_mask_sample_0.nii.gz"
FAST_PATH = ("dpmpp2m-sde", 20)  # the scheduler and steps a user gets with --scheduler dpmpp2m-sde
PROGRESS = re.compile(r"step (\d+)/\d+, ([\d.]+) s elapsed")
COMPILE = re.compile(r"OpenVINO: compiled for .* in ([\d.]+) s")
MODES = ("in-process", "in-process-bf16", "in-process-mixed", "triton-shm", "triton-server-loop")
RUNTIMES = {"in-process": "openvino", "in-process-bf16": "openvino-bf16", "in-process-mixed": "openvino-mixed"}
MODE_ARGUMENTS = {
    "in-process": [],
    "in-process-bf16": ["--precision", "bf16"],
    "in-process-mixed": ["--precision", "mixed"],
    "triton-shm": ["--triton-transport", "shm"],
    "triton-server-loop": ["--triton-loop", "server"],
}


def build_model(side: int, folder: Path) -> tuple[ServedModel, TimedRun]:
    """The whole-head UNet (random weights, Med-DDPM's `ema` layout) at side^3, exported into folder/repository."""
    arguments = ["--preset", "whole-head"]
    presets = load_presets()
    if side != presets["whole-head"].image.grid[0]:
        name, presets_file = preset_at_grid("whole-head", side, folder)
        arguments = ["--preset", name, "--presets", str(presets_file)]
        presets = load_presets(presets_file)
    preset = presets[arguments[1]]
    checkpoint = folder / "whole_head_random.pt"
    save_meddpm_checkpoint(checkpoint, random_unet(preset), preset, step=0)
    repository = folder / "repository"
    export = [sys.executable, "-m", "export", "--checkpoint", str(checkpoint), *arguments]
    run = timed_run([*export, "--repository", str(repository), "--name", "meddpm_full"], REPO)
    return find_model(repository, "meddpm_full"), run


def run_mode(mode: str, model: ServedModel, steps: int, out: Path, server: LocalTriton | None) -> dict:
    """One app run of `mode`; its figures."""
    output = out / mode
    command = [sys.executable, "-m", "app", "-i", str(MASK), "-o", str(output), "-m", str(model.folder.parent)]
    command += ["--model-name", model.name, "--scheduler", FAST_PATH[0], "--steps", str(steps), "--seed", "3"]
    command += ["-l", "INFO", *MODE_ARGUMENTS[mode.removesuffix("-again")]]
    env = {"TRITON_SERVER_NETLOC": f"localhost:{server.grpc_port}"} if server else {}
    run = timed_run(command, REPO, env, FIRST_STEP)
    record = json.loads((output / MASK.name.removesuffix(".nii.gz") / "record.json").read_text())
    per_step = steady_step_s(run.output)
    figures = {
        "mode": mode,
        "backend": record["backend"],
        "wall_s": round(run.wall_s, 1),
        "first_step_s": round(run.first_step_s or float("nan"), 1),
        "compile_s": round(sum(float(s) for s in COMPILE.findall(run.output)), 2) if server is None else None,
        "per_step_s": round(per_step, 3),
        "outside_sampling_s": round(run.wall_s - (steps - 1) * per_step, 1),
        "app_peak_mib": round(run.peak_rss_mib),
        "estimate_mib": round(estimate_bytes(model, RUNTIMES.get(mode.removesuffix("-again"))) / 2**20),
    }
    if server is not None:
        figures["server_peak_mib"] = round(server_peak_mib(server))
    figures["fast_path_estimate_s"] = round(figures["outside_sampling_s"] + (FAST_PATH[1] - 1) * per_step, 1)
    figures["ddpm250_estimate_s"] = round(figures["outside_sampling_s"] + 249 * per_step)
    return figures


def reweigh_mixed(runs: list[dict], model: ServedModel) -> None:
    """Mixed runs its steps at t >= 0.8 T in FP32 and the rest in BF16, so its few measured steps do not stand for a
    whole volume's: its estimates take the FP32 and BF16 runs' step times, weighted by each schedule's steps."""
    by_mode = {r["mode"]: r for r in runs}
    if not {"in-process", "in-process-bf16", "in-process-mixed"} <= set(by_mode):
        return
    mixed, timesteps = by_mode["in-process-mixed"], model.preset.schedule.timesteps
    step_s = {
        p: by_mode[m]["per_step_s"] for p, m in ((Precision.FP32, "in-process"), (Precision.BF16, "in-process-bf16"))
    }
    for key, (scheduler, steps) in (("fast_path_estimate_s", FAST_PATH), ("ddpm250_estimate_s", ("ddpm", 250))):
        later = make_scheduler(scheduler, model.preset.schedule, steps).timesteps[1:]  # the first is in `outside`
        sampled = sum(step_s[step_precision(Precision.MIXED, float(t), timesteps)] for t in later)
        mixed[key] = round(mixed["outside_sampling_s"] + sampled, 1)


def steady_step_s(output: str) -> float:
    """Seconds per step after the first (which also compiles the graph), from the app's progress lines."""
    elapsed = {int(done): float(seconds) for done, seconds in PROGRESS.findall(output)}
    first, last = min(elapsed), max(elapsed)
    if last == first:
        raise RuntimeError("a steady step time needs --steps 2 or more")
    return (elapsed[last] - elapsed[first]) / (last - first)


def estimate_bytes(model: ServedModel, runtime: str | None) -> int:
    """The app's per-mask memory estimate for this run (meddpm.imaging.memory): in process with `runtime`'s
    calibration, or served (None)."""
    mask = read_mask(MASK, model.preset)
    grid = ModelGrid(mask.labels.shape, mask.affine, model.preset)
    weights = model.onnx_path.stat().st_size if runtime else None
    return mask_memory_estimate(grid, 1, 1, weights, (OutputFormat.NIFTI,), runtime)


def server_peak_mib(server: LocalTriton) -> float:
    """The Triton server's processes' peak resident memory (VmHWM), stubs of the python backend included."""
    assert server.process is not None
    total = 0
    for pid in process_tree(server.process.pid):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024


def volume(out: Path, mode: str) -> np.ndarray:
    return np.asarray(nib.load(out / mode / MASK.name.removesuffix(".nii.gz") / "sample_0.nii.gz").dataobj)


def measure(side: int, steps: int, modes: list[str], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    skipped = {}
    if not native_bf16():
        skipped = {m: "no native BF16 on this CPU" for m in modes if m in ("in-process-bf16", "in-process-mixed")}
    with tempfile.TemporaryDirectory(dir=out) as work:
        model, export = build_model(side, Path(work))
        print(f"export: {export.wall_s:.0f} s, peak {export.peak_rss_mib:.0f} MiB", flush=True)
        runs = []
        local = [m for m in modes if m.startswith("in-process") and m not in skipped]
        for mode in [*local[:1], f"{local[0]}-again", *local[1:]] if local else []:
            runs.append(run_mode(mode, model, steps, out, None))
            print(json.dumps(runs[-1]), flush=True)
        served = [m for m in modes if m.startswith("triton")]
        if served:
            with LocalTriton(model.folder.parent, log_path=out / "triton.log") as server:
                for mode in served:
                    runs.append(run_mode(mode, model, steps, out, server))
                    print(json.dumps(runs[-1]), flush=True)
        reweigh_mixed(runs, model)
        reference = volume(out, runs[0]["mode"]) if runs else None
        for figures in runs:
            figures["max_abs_diff_vs_first"] = float(np.abs(volume(out, figures["mode"]) - reference).max())
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "native_bf16": native_bf16(),
        "grid": side,
        "steps_run": steps,
        "scheduler": FAST_PATH[0],
        "export": {"wall_s": round(export.wall_s, 1), "peak_mib": round(export.peak_rss_mib)},
        "runs": runs,
        "skipped": skipped | {"map": "run scripts/map_check.sh for the MAP (root and podman, about 15 min)"},
    }


def print_table(result: dict) -> None:
    print(
        f"\n{result['cpu']}, {result['cores']} cores, native BF16: {result['native_bf16']}; whole-head architecture "
        f"at {result['grid']}^3, {result['scheduler']} {result['steps_run']} steps run; export "
        f"{result['export']['wall_s']} s, peak {result['export']['peak_mib']} MiB"
    )
    print(
        "| mode | wall s | first step s | compile s | s/step | fast path (20) est. s | DDPM-250 est. s | app peak MiB "
        "(estimate) | server peak MiB | max abs diff |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in result["runs"]:
        print(
            f"| {r['mode']} | {r['wall_s']} | {r['first_step_s']} | {r['compile_s'] or '-'} | {r['per_step_s']} | "
            f"{r['fast_path_estimate_s']} | "
            f"{r['ddpm250_estimate_s']} | {r['app_peak_mib']} ({r['estimate_mib']}) | "
            f"{r.get('server_peak_mib', '-')} | {r['max_abs_diff_vs_first']:.2e} |"
        )
    for mode, why in result["skipped"].items():
        print(f"not run: {mode}: {why}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="steps run per mode (the fast path's 20 are estimated)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, default=REPO / "build" / "full-size")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--export-to", type=Path, help="only export the model into this folder's repository/")
    args = parser.parse_args()
    if args.export_to:
        args.export_to.mkdir(parents=True, exist_ok=True)
        model, _ = build_model(args.grid, args.export_to)
        print(model.folder.parent)
        return
    result = measure(args.grid, args.steps, args.modes, args.out)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
