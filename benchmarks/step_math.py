"""The loop's own work per step, without the UNet: x0 clipping and the scheduler step, at full size.

    python -m benchmarks.step_math [--grid 128] [--steps 20] [--schedulers ...] [--json FILE]

On a GPU a whole-head UNet call takes ~28 ms at best (benchmarks/gpu_unet.py); the loop's host-side math
(clip x0, then the scheduler's update, on a 128^3 volume) must stay well under that for the loop not to become
the bottleneck. Per scheduler this times `clip_x0_in_epsilon` (in place, as the loop runs it) against the
same formula with temporaries (how it was written before), then `scheduler.step`, on random epsilon.
Interleaved, one process; prints medians and the share of the 28 ms floor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.gpu_unet import FLOOR_MS_128
from meddpm.model.presets import Scheduler, get_preset
from meddpm.sampling.loop import clip_x0_in_epsilon, initial_noise, noise_arguments, step_alpha_bars
from meddpm.sampling.schedulers import make_scheduler


def clip_with_temporaries(epsilon: torch.Tensor, sample: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """The same clipping as `clip_x0_in_epsilon`, written out of place (the "before")."""
    sqrt_a, sqrt_one_minus_a = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
    x0 = ((sample - sqrt_one_minus_a * epsilon) / sqrt_a).clamp_(-1.0, 1.0)
    return (sample - sqrt_a * x0) / sqrt_one_minus_a


def measure(name: str, side: int, steps: int) -> dict:
    schedule = get_preset("whole-head").schedule
    scheduler = make_scheduler(name, schedule, steps)
    x, generators = initial_noise((1, 1, side, side, side), [0])
    alpha_bars = step_alpha_bars(scheduler)
    stochastic = noise_arguments(scheduler, generators)
    noise_source = torch.Generator().manual_seed(1)
    times = {"clip in place": [], "clip with temporaries": [], "scheduler step": []}
    for i, t in enumerate(scheduler.timesteps):
        epsilon = torch.randn(x.shape, generator=noise_source)
        started = time.perf_counter()
        clip_with_temporaries(epsilon, x, alpha_bars[i])
        times["clip with temporaries"].append(time.perf_counter() - started)
        started = time.perf_counter()
        epsilon = clip_x0_in_epsilon(epsilon, x, alpha_bars[i])
        times["clip in place"].append(time.perf_counter() - started)
        started = time.perf_counter()
        x = scheduler.step(epsilon, t, x, **stochastic).prev_sample
        times["scheduler step"].append(time.perf_counter() - started)
    medians = {part: 1e3 * statistics.median(values) for part, values in times.items()}
    step_ms = medians["clip in place"] + medians["scheduler step"]
    return {
        "scheduler": name,
        "grid": side,
        "ms": medians,
        "step_ms": step_ms,
        "share_of_floor": step_ms / FLOOR_MS_128,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_math", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, default=128, help="cube side")
    parser.add_argument("--steps", type=int, default=20, help="steps timed per scheduler")
    parser.add_argument("--schedulers", nargs="+", type=Scheduler, choices=list(Scheduler), default=list(Scheduler))
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    rows = [measure(name, args.grid, args.steps) for name in args.schedulers]
    header = (
        f"{platform.node()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {time.strftime('%Y-%m-%d')}: {args.grid}³, batch 1, "
        f"medians over {args.steps} steps"
    )
    print(header)
    print(
        "| scheduler | clip with temporaries ms | clip in place ms | scheduler step ms | loop math ms/step | "
        "share of the 28 ms GPU floor |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        ms = r["ms"]
        print(
            f"| {r['scheduler']} | {ms['clip with temporaries']:.1f} | {ms['clip in place']:.1f} | "
            f"{ms['scheduler step']:.1f} | {r['step_ms']:.1f} | {100 * r['share_of_floor']:.0f}% |"
        )
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
