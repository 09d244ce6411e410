"""ONNX Runtime settings for the UNet call, side by side in one run: which session options and bindings pay.

    python -m benchmarks.onnxruntime_options [--grids 32 64] [--calls 10] [--rounds 3] [--json FILE]

The demo model is exported at each grid (as benchmarks.sampling_loop does) and called with one noisy image,
condition and timestep per variant. Variants take turns in blocks of `--calls` calls, in an order that rotates
every round, so that machine noise falls on all alike; the first call of a block is not timed, since the
previous variant's worker threads may still be spinning on the same cores.
Variants:
- stock: `InferenceSession(path)` and `session.run`, no options (what the app did before this tuning);
- threads-N: intra-op threads pinned to N (stock uses one per physical core);
- no-spinning: worker threads sleep between calls instead of spinning (`session.intra_op.allow_spinning` 0);
- extended: graph optimisations up to "extended" only (stock: "all", which adds layout transformations);
- io-binding: the condition bound once per volume, the output written straight into a caller-owned array
  (what `meddpm.backends.onnxruntime_denoiser.OnnxRuntimeDenoiser` does).
Prints per variant the median call time, its interquartile range and the ratio to stock.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.demo_grid import demo_at_grid
from meddpm.backends.onnxruntime_denoiser import OnnxRuntimeDenoiser
from meddpm.model.tensors import INPUTS, PREDICTED_NOISE
from meddpm.sampling.denoiser import Denoiser, NoisePredictor

VARIANTS = ("stock", "threads-1", "threads-2", "no-spinning", "extended", "io-binding")


def stock_session(onnx_path: Path, **options: object) -> ort.InferenceSession:
    """A CPU session with default options, changed only where `options` says (`config`: session config entries)."""
    settings = ort.SessionOptions()
    for key, value in options.items():
        if key == "config":
            for entry, setting in value.items():
                settings.add_session_config_entry(entry, setting)
        else:
            setattr(settings, key, value)
    return ort.InferenceSession(str(onnx_path), settings, providers=["CPUExecutionProvider"])


class StockOnnxRuntimeDenoiser(Denoiser):
    """The untuned baseline: a default session and `session.run` with every input, every step."""

    name = "onnxruntime-stock"

    def __init__(self, onnx_path: Path, **options: object):
        self.session = stock_session(onnx_path, **options)

    @contextlib.contextmanager
    def conditioned(self, condition: np.ndarray) -> Iterator[NoisePredictor]:
        def predict_noise(noisy_image: np.ndarray, timestep: np.ndarray) -> np.ndarray:
            feed = dict(zip(INPUTS, (noisy_image, condition, timestep)))
            return self.session.run([PREDICTED_NOISE], feed)[0]

        yield predict_noise


def variant_call(
    name: str, onnx_path: Path, condition: np.ndarray, stack: contextlib.ExitStack
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A function (noisy_image, timestep) -> noise running the UNet as the variant says."""
    if name == "io-binding":  # bound once, as for one volume
        return stack.enter_context(OnnxRuntimeDenoiser(onnx_path).conditioned(condition))
    options = {
        "stock": {},
        "threads-1": {"intra_op_num_threads": 1},
        "threads-2": {"intra_op_num_threads": 2},
        "no-spinning": {"config": {"session.intra_op.allow_spinning": "0"}},
        "extended": {"graph_optimization_level": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED},
    }[name]
    denoiser = StockOnnxRuntimeDenoiser(onnx_path, **options)
    return lambda noisy_image, timestep: denoiser.predict(noisy_image, timestep, condition)


def measure_grid(side: int, calls: int, rounds: int, variants: list[str], folder: Path) -> dict:
    model = demo_at_grid(side, folder)
    rng = np.random.default_rng(0)
    shape = model.preset.image.grid
    noisy = rng.standard_normal((1, model.preset.out_channels, *shape), dtype=np.float32)
    condition = np.sign(rng.standard_normal((1, len(model.preset.condition.labels), *shape), dtype=np.float32))
    timestep = np.array([100.0], dtype=np.float32)
    times = {name: [] for name in variants}
    with contextlib.ExitStack() as stack:
        runners = {name: variant_call(name, model.onnx_path, condition, stack) for name in variants}
        outputs = {name: run(noisy, timestep) for name, run in runners.items()}  # warm-up; results compared
        for round_ in range(rounds):
            order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
            for name in order:
                runners[name](noisy, timestep)  # not timed: the previous session's threads may still spin
                for _ in range(calls):
                    started = time.perf_counter()
                    runners[name](noisy, timestep)
                    times[name].append(time.perf_counter() - started)
    stock = statistics.median(times["stock"]) if "stock" in times else None
    rows = {}
    for name, values in times.items():
        median = statistics.median(values)
        rows[name] = {
            "ms_median": 1e3 * median,
            "ms_iqr": 1e3 * float(np.subtract(*np.percentile(values, [75, 25]))),
            "ratio_vs_stock": median / stock if stock else None,
            "max_abs_diff_vs_first": float(np.abs(outputs[name] - outputs[variants[0]]).max()),
        }
    return {"grid": side, "calls": calls * rounds, "variants": rows}


def table(results: list[dict]) -> str:
    lines = ["| grid | variant | ms/call (median ± IQR) | ratio vs stock | max abs diff |", "|---|---|---|---|---|"]
    for r in results:
        for name, f in r["variants"].items():
            ratio = "-" if f["ratio_vs_stock"] is None else f"{f['ratio_vs_stock']:.3f}"
            lines.append(
                f"| {r['grid']}³ | {name} | {f['ms_median']:.1f} ± {f['ms_iqr']:.1f} | {ratio} | "
                f"{f['max_abs_diff_vs_first']:.1e} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.onnxruntime_options", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--grids", type=int, nargs="+", default=[32, 64], help="cube sides, multiples of 4")
    parser.add_argument("--calls", type=int, default=10, help="calls per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        results = [measure_grid(side, args.calls, args.rounds, args.variants, Path(folder)) for side in args.grids]
    header = (
        f"{platform.node()}, {os.cpu_count()} CPU cores, ONNX Runtime {ort.__version__}, "
        f"{time.strftime('%Y-%m-%d')}: demo model, batch 1, {args.calls * args.rounds} calls per variant"
    )
    print(header)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
