"""The app's start-up, side by side in one run: what the imports cost, and the time to the first UNet call.

    python -m benchmarks.startup [--repository model_repository] [--repeats 5] [--checkout PATH ...] [--json FILE]

Each row is a fresh interpreter, timed from its start: the interpreter alone; the libraries the app loads (torch;
MONAI core, whose package import loads every module under `monai`, the MONAI Deploy SDK's operators included; the
SDK's `monai.deploy.core`; diffusers' utilities, which import torch._dynamo); then, for each checkout (this one by
default; pass an older one to compare), `python -m app --help`, `import app.app`, and a one-mask in-process run
(DDIM, 2 steps) to its first step and to its end. Rows are interleaved repeat by repeat so that the machine's noise
falls on all alike; min and median are printed, and the ratio of each checkout's run to the first's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.app_runs import FIRST_STEP, cpu_model, timed_run
from meddpm.imaging.phantom_heads import make_phantom

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = {
    "interpreter alone": "pass",
    "torch": "import torch",
    "MONAI core (import monai)": "import monai",
    "MONAI Deploy SDK (monai.deploy.core)": "import monai.deploy.core",
    "torch + diffusers' utilities (torch._dynamo)": "import torch, diffusers.utils.torch_utils",
}


Row = tuple[list[str], Path, re.Pattern | None]  # command, where it runs, the line that marks its first step


def rows(checkouts: list[Path], repository: Path, mask: Path, out: Path) -> dict[str, Row]:
    """Row name -> (command, cwd, first-step line); the app's rows once per checkout."""
    python = sys.executable
    table: dict[str, Row] = {name: ([python, "-c", code], REPO, None) for name, code in LIBRARIES.items()}
    for index, checkout in enumerate(checkouts):
        tag = f"[{index}] " if len(checkouts) > 1 else ""
        table[f"{tag}python -m app --help"] = ([python, "-m", "app", "--help"], checkout, None)
        table[f"{tag}import app.app"] = ([python, "-c", "import app.app"], checkout, None)
        run = [python, "-m", "app", "-i", mask, "-o", out / str(index), "-m", repository, "-l", "INFO"]
        table[f"{tag}app run: one mask, DDIM 2 steps"] = (
            [*map(str, run), "--scheduler", "ddim", "--steps", "2", "--seed", "1"],
            checkout,
            FIRST_STEP,
        )
    return table


def measure(checkouts: list[Path], repository: Path, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        import nibabel as nib

        labels, _ = make_phantom(np.random.default_rng(0), (32, 32, 32), 6.0)
        mask = Path(folder) / "head.nii.gz"
        nib.save(nib.Nifti1Image(labels, np.diag([6.0, 6.0, 6.0, 1.0])), mask)
        table = rows(checkouts, repository.resolve(), mask, Path(folder) / "out")
        ends: dict[str, list[float]] = {name: [] for name in table}
        firsts: dict[str, list[float]] = {name: [] for name in table if table[name][2]}
        for repeat in range(repeats):
            names = list(table)
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                command, cwd, first_line = table[name]
                run = timed_run(command, cwd, first_line=first_line)
                ends[name].append(run.wall_s)
                if first_line is not None:
                    assert run.first_step_s is not None, f"{name}: no 'step 1/' line"
                    firsts[name].append(run.first_step_s)
    result = {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "repeats": repeats,
        "checkouts": [str(c) for c in checkouts],
        "rows": {
            name: {"end_s_min": min(v), "end_s_median": statistics.median(v)}
            | ({"first_step_s_min": min(firsts[name]), "first_step_s_median": statistics.median(firsts[name])}
               if name in firsts else {})
            for name, v in ends.items()
        },
    }  # fmt: skip
    runs = [name for name in result["rows"] if name.endswith("DDIM 2 steps")]
    for name in runs[1:]:
        for key in ("first_step_s_median", "end_s_median"):
            result["rows"][name][key.replace("_s_median", "_ratio_vs_[0]")] = (
                result["rows"][name][key] / result["rows"][runs[0]][key]
            )
    return result


def print_table(result: dict) -> None:
    print(f"{result['cpu']}, {result['cores']} cores, {result['repeats']} repeats, interleaved")
    print("| process | to its end: min / median (s) | to the first step: min / median (s) |\n|---|---|---|")
    for name, row in result["rows"].items():
        first = "-"
        if "first_step_s_min" in row:
            first = f"{row['first_step_s_min']:.2f} / {row['first_step_s_median']:.2f}"
        ratio = f" ({row['end_ratio_vs_[0]']:.2f}x of [0])" if "end_ratio_vs_[0]" in row else ""
        print(f"| {name} | {row['end_s_min']:.2f} / {row['end_s_median']:.2f}{ratio} | {first} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=REPO / "model_repository")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkout", type=Path, action="append", help="a checkout whose app to time (repeatable)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args.checkout or [REPO], args.repository, args.repeats)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
