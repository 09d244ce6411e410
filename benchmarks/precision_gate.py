"""The quality gate of reduced precision: may `--precision auto` run a model in BF16 (or mixed) on a CPU?

    python -m benchmarks.precision_gate [--repository model_repository] [--masks 16] [--bf16 native|emulated]
                                        [--per-call-grid 64] [--runs ddpm:250 dpmpp2m-sde:20] [--json FILE]

Each reduced-precision configuration (bf16; mixed: fp32 at t >= 0.8 T, bf16 below) synthesises the quality
benchmark's held-out phantom masks from the same initial noise as FP32, with DDPM-250 and with the fast path
(dpmpp2m-sde, 20 steps), and each sample's Dice against its mask is compared with its FP32 twin's. A configuration
passes when, in every run and for every label, the mean paired difference ± two standard errors lies within
±0.01 Dice. `auto` takes the cheapest configuration that passed (bf16, then mixed) from the model's preset
(`gated_precision` in presets.toml, set from this benchmark's verdict), and only on a CPU with native BF16.

- native: OpenVINO BF16 against OpenVINO FP32, on a CPU with AMX or AVX512-BF16;
- emulated (any CPU): the graph with BF16-rounded convolution and matrix-product operands, in ONNX Runtime, against
  ONNX Runtime FP32 (benchmarks/bf16_emulation.py).

First, the per-call error of each against FP32 (and of the emulation against native BF16 where the CPU has it) is
printed for the gate's model and for Med-DDPM's whole-head architecture with random weights at `--per-call-grid`,
the figure native BF16 was first measured at (max relative error 4.7e-3 at 64^3, about 5e-3 at t = 200).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.app_runs import cpu_model
from benchmarks.bf16_emulation import EmulatedBf16Denoiser
from benchmarks.full_size import build_model
from benchmarks.quality import Head, held_out_heads, paired_difference, stats, synthesise_and_score
from meddpm.backends.openvino_denoiser import OpenVinoDenoiser, native_bf16
from meddpm.choices import parse_choice
from meddpm.imaging.demo_heads import HeadSource, head_source
from meddpm.model.presets import Precision, Scheduler
from meddpm.model.served_model import ServedModel, find_model
from meddpm.sampling.denoiser import Denoiser
from meddpm.sampling.loop import DenoiserLoop
from meddpm.synthesis import SynthesisPipeline

REDUCED = (Precision.BF16, Precision.MIXED)  # cheapest first: the order `auto` tries them in
RUNS = ((Scheduler.DDPM, 250), (Scheduler.DPMPP2M_SDE, 20))  # Med-DDPM's sampler and the fast path
TOLERANCE = 0.01  # Dice: the paired difference's mean ± 2 standard errors must lie within it
PER_CALL_TIMESTEPS = (0, 50, 100, 200, 249)


def make_denoiser(model: ServedModel, precision: Precision, kind: str, work: Path) -> Denoiser:
    timesteps = model.preset.schedule.timesteps
    if kind == "native":
        return OpenVinoDenoiser(model.onnx_path, precision, timesteps)
    return EmulatedBf16Denoiser(model.onnx_path, precision, timesteps, work)


def per_call_errors(model: ServedModel, kinds: list[str], work: Path, seed: int = 0) -> dict:
    """Max relative error of one UNet call against FP32, per kind and timestep, on inputs of the model's grid: a
    noisy image x_t of unit-variance noise and a random two-label condition. With both kinds, also emulated vs
    native."""
    rng = np.random.default_rng(seed)
    preset = model.preset
    grid = tuple(preset.image.grid)
    noisy = rng.standard_normal((1, preset.out_channels, *grid)).astype(np.float32)
    condition = np.sign(rng.standard_normal((1, preset.condition_channels, *grid))).astype(np.float32)
    outputs: dict[str, dict[int, np.ndarray]] = {}
    for name, kind, precision in [
        ("fp32", "native", Precision.FP32),
        *((kind, kind, Precision.BF16) for kind in kinds),
    ]:
        with make_denoiser(model, precision, kind, work) as denoiser:
            outputs[name] = {
                t: denoiser.predict(noisy, np.full((1,), t, np.float32), condition) for t in PER_CALL_TIMESTEPS
            }
    pairs = [(kind, "fp32") for kind in kinds] + ([("emulated", "native")] if len(kinds) == 2 else [])
    return {
        f"{a} vs {b}": {
            t: float(np.abs(outputs[a][t] - outputs[b][t]).max() / np.abs(outputs[b][t]).max())
            for t in PER_CALL_TIMESTEPS
        }
        for a, b in pairs
    }


def gate(model: ServedModel, kind: str, masks: int, seed: int, runs: list[tuple[str, int]], work: Path) -> dict:
    """Every run at FP32 and at each reduced precision from the same noise; the paired Dice differences; verdicts."""
    source = head_source(model.preset.name)
    held_out = held_out_heads(model.preset, masks, seed)
    print(_header(list(source.labels)))
    rows, verdicts = [], {}
    with contextlib.ExitStack() as stack:  # each precision's runtime (and BF16-rounded graph) built once
        pipelines = {
            precision: SynthesisPipeline(
                model, DenoiserLoop(stack.enter_context(make_denoiser(model, precision, kind, work))), batch_size=2
            )
            for precision in (Precision.FP32, *REDUCED)
        }
        for scheduler, steps in runs:
            rows += _compare(pipelines, source, held_out, scheduler, steps, seed, verdicts)
    passed = [p for p in REDUCED if verdicts[str(p)]]
    return {"runs": rows, "passed": [str(p) for p in passed], "gated_precision": str(passed[0] if passed else "fp32")}


def _compare(
    pipelines: dict[Precision, SynthesisPipeline],
    source: HeadSource,
    held_out: list[Head],
    scheduler: str,
    steps: int,
    seed: int,
    verdicts: dict[str, bool],
) -> list[dict]:
    """One run at every precision; its rows, each reduced precision's verdict folded into `verdicts`."""
    rows, scores = [], {}
    for precision, pipeline in pipelines.items():
        started = time.monotonic()
        scores[precision], diversity, _ = synthesise_and_score(pipeline, source, held_out, scheduler, steps, seed)
        row = {
            "scheduler": str(scheduler),
            "steps": steps,
            "precision": str(precision),
            "seconds": round(time.monotonic() - started, 1),
            **{f"dice_{label}": stats(scores[precision][label]) for label in source.labels},
            "diversity": stats(diversity),
        }
        if precision != Precision.FP32:
            differences = {
                label: paired_difference(scores[precision][label], scores[Precision.FP32][label])
                for label in source.labels
            }
            row["vs_fp32"] = differences
            row["within_tolerance"] = all(_within(d) for d in differences.values())
            verdicts[str(precision)] = verdicts.get(str(precision), True) and row["within_tolerance"]
        rows.append(row)
        print(_row(row, list(source.labels)), flush=True)
    return rows


def scheduler_steps(text: str) -> tuple[str, int]:
    scheduler, _, steps = text.partition(":")
    return parse_choice(Scheduler, scheduler, "scheduler"), int(steps)


def _within(difference: dict) -> bool:
    """Mean ± 2 standard errors within ±TOLERANCE; a label with fewer than two pairs (no tumours) is not judged."""
    if difference["n"] < 2:
        return True
    return abs(difference["mean"]) + 2 * difference["sem"] <= TOLERANCE


def _header(labels: list[str]) -> str:
    columns = ["run", "precision", *(f"Dice {label}" for label in labels), *(f"Δ {label} vs FP32" for label in labels)]
    columns += [f"within ±{TOLERANCE}", "seconds"]
    return "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"


def _row(row: dict, labels: list[str]) -> str:
    def paired(label: str) -> str:
        d = row.get("vs_fp32", {}).get(label, {})
        return f"{d['mean']:+.4f} ± {d['sem']:.4f}" if d.get("n", 0) >= 2 else "-"

    within = {True: "yes", False: "no"}.get(row.get("within_tolerance"), "-")
    cells = [f"{row['scheduler']} {row['steps']}", row["precision"]]
    cells += [*(f"{row[f'dice_{label}']['mean']:.4f}" for label in labels), *(paired(label) for label in labels)]
    return "| " + " | ".join([*cells, within, str(row["seconds"])]) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model-name", default="meddpm_demo")
    parser.add_argument("--masks", type=int, default=16)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bf16", choices=("native", "emulated"), help="default: native where the CPU has it")
    parser.add_argument(
        "--per-call-grid", type=int, default=64, help="whole-head side for the per-call check (0: none)"
    )
    parser.add_argument(
        "--runs", nargs="+", type=scheduler_steps, default=list(RUNS), help="SCHEDULER:STEPS (the gate: the defaults)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    native = native_bf16()
    kind = args.bf16 or ("native" if native else "emulated")
    if kind == "native" and not native:
        parser.error("--bf16 native needs a CPU with native BF16 (AMX or AVX512-BF16); use --bf16 emulated")
    model = find_model(args.repository, args.model_name)
    result: dict = {"cpu": cpu_model(), "native_bf16": native, "kind": kind, "model": model.name, "masks": args.masks}
    with tempfile.TemporaryDirectory() as work:
        kinds = ["native", "emulated"] if native else ["emulated"]
        result["per_call"] = {model.name: per_call_errors(model, kinds, Path(work))}
        if args.per_call_grid:
            whole_head, _ = build_model(args.per_call_grid, Path(work))
            result["per_call"][f"whole-head {args.per_call_grid}^3"] = per_call_errors(whole_head, kinds, Path(work))
        for graph, errors in result["per_call"].items():
            for pair, by_timestep in errors.items():
                shown = ", ".join(f"t={t}: {e:.1e}" for t, e in by_timestep.items())
                print(f"per call, {graph}, {pair}: max relative error {shown}", flush=True)
        result |= gate(model, kind, args.masks, args.seed, args.runs, Path(work))
    print(
        f"passed (every run, every label within ±{TOLERANCE} Dice at 2 standard errors): "
        f"{', '.join(result['passed']) or 'none'}; --precision auto on a CPU with native BF16: "
        f"{result['gated_precision']} ({kind} BF16, {result['cpu']})"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
