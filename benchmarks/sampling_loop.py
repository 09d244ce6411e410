"""The sampling loop, side by side in one run: Med-DDPM's reference loop, ours in process, ours on Triton.

    python -m benchmarks.sampling_loop [--grids 32 64] [--steps 20] [--repeats 5] [--backends ...] [--json FILE]
                                       [--link-rate 100mbit]

Backends (all on the demo model, exported at each grid: its weights are convolutions, any grid divisible by 4):
- reference: Med-DDPM's own loop: the PyTorch UNet in eager mode, the condition concatenated every step, its
  DDPM posterior step (x0 clipped) with the schedule buffers it stores;
- onnxruntime-stock: our loop with an untuned ONNX Runtime session (default options, `session.run` with every
  input every step): the "before" of the tuning that benchmarks/onnxruntime_options.py measures;
- onnxruntime: our loop (meddpm.sampling.loop, diffusers scheduler) with ONNX Runtime in process as the app runs it
  (condition bound once, noise written into the loop's own array);
- triton-network, triton-shm: our loop against the local Triton server (harness/local_triton.py) over gRPC,
  tensors in the messages or in system shared memory;
- triton-server-loop: the same loop inside that server (<name>_sampler, UNet through BLS): one request per
  volume, progress streamed back.
Every backend runs `steps` steps from the same condition and seed, repeated; the order rotates every repeat so
that machine noise falls on all alike. Per step it separates the UNet call (for Triton: the round trip) from the
rest of the loop (scheduler math, copies; not separable for the server-side loop). Peak resident memory is read per
backend (Linux VmHWM, reset before each backend's runs); for Triton the server's processes are added. Prints a
table, writes JSON. With --link-rate (root) the server runs behind a rate-limited link (benchmarks/limited_link.py)
instead of loopback; shared memory is then out of reach, as for a server on another host.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from benchmarks.demo_grid import DEMO_CHECKPOINT, demo_at_grid
from benchmarks.limited_link import Link, limited_link
from benchmarks.onnxruntime_options import StockOnnxRuntimeDenoiser
from harness.local_triton import LocalTriton
from meddpm.backends.onnxruntime_denoiser import OnnxRuntimeDenoiser
from meddpm.backends.openvino_denoiser import OpenVinoDenoiser
from meddpm.backends.triton_client.client import TritonDenoiser
from meddpm.backends.triton_client.server_loop import TritonServerLoop
from meddpm.imaging.geometry import ModelGrid
from meddpm.imaging.phantom_heads import make_phantom
from meddpm.model.checkpoint import load_checkpoint
from meddpm.model.presets import Precision, Scheduler
from meddpm.model.schedule import betas, meddpm_buffers
from meddpm.model.served_model import ServedModel
from meddpm.sampling.denoiser import Denoiser, NoisePredictor
from meddpm.sampling.loop import DenoiserLoop, Sampler
from meddpm.sampling.request import SamplingRequest

BACKENDS = (
    "reference", "onnxruntime-stock", "onnxruntime", "openvino", "triton-network", "triton-shm", "triton-server-loop"
)  # fmt: skip
SERVED_RUNTIME = "openvino"  # what the local Triton's _cpu model runs: the Triton loops must give its image


@dataclasses.dataclass
class Run:
    """One volume: the image, each step's duration and the UNet call's share of it."""

    image: np.ndarray
    step_s: list[float]
    unet_s: list[float]
    volume_s: float


class TimedDenoiser(Denoiser):
    """Wraps a denoiser and records how long each UNet call takes."""

    def __init__(self, inner: Denoiser):
        self.inner = inner
        self.name = inner.name
        self.calls: list[float] = []

    @contextlib.contextmanager
    def conditioned(self, condition: np.ndarray) -> Iterator[NoisePredictor]:
        with self.inner.conditioned(condition) as predict_noise:

            def timed(noisy_image: np.ndarray, timestep: np.ndarray) -> np.ndarray:
                started = time.perf_counter()
                noise = predict_noise(noisy_image, timestep)
                self.calls.append(time.perf_counter() - started)
                return noise

            yield timed


def timed_volume(
    sampler: Sampler, model: ServedModel, condition: np.ndarray, steps: int, seed: int, unet_calls: list[float]
) -> Run:
    """One DDIM volume by `sampler` (the core's loop, here or in Triton), each step timed by its progress."""
    marks = []
    started = time.perf_counter()
    image = sampler.sample(
        condition,
        SamplingRequest(Scheduler.DDIM, steps, seed),
        model.preset,
        progress=lambda done, total, elapsed: marks.append(time.perf_counter()),
    )
    return Run(image, np.diff([started, *marks]).tolist(), unet_calls, time.perf_counter() - started)


def our_loop(denoiser: Denoiser, model: ServedModel, condition: np.ndarray, steps: int, seed: int) -> Run:
    timed = TimedDenoiser(denoiser)
    return timed_volume(DenoiserLoop(timed), model, condition, steps, seed, timed.calls)


def server_loop(loop: TritonServerLoop, model: ServedModel, condition: np.ndarray, steps: int, seed: int) -> Run:
    """Steps timed by their streamed progress; the UNet's share is not seen from the client."""
    return timed_volume(loop, model, condition, steps, seed, [])


def reference_loop(unet: torch.nn.Module, model: ServedModel, condition: np.ndarray, steps: int, seed: int) -> Run:
    """Med-DDPM's p_sample_loop for the first `steps` of its 250 DDPM steps (a step costs the same at any t)."""
    buffers = meddpm_buffers(betas(model.preset.schedule))
    generator = torch.Generator().manual_seed(seed)
    c = torch.from_numpy(condition)[None]
    x = torch.randn((1, model.preset.out_channels, *condition.shape[1:]), generator=generator)
    step_s, unet_s = [], []
    started = time.perf_counter()
    with torch.no_grad():
        for t in range(model.preset.schedule.timesteps - 1, model.preset.schedule.timesteps - 1 - steps, -1):
            step_start = time.perf_counter()
            timestep = torch.full((1,), t, dtype=torch.long)
            eps = unet(torch.cat([x, c], dim=1), timestep)
            unet_s.append(time.perf_counter() - step_start)
            x0 = (buffers["sqrt_recip_alphas_cumprod"][t] * x - buffers["sqrt_recipm1_alphas_cumprod"][t] * eps).clamp(
                -1, 1
            )
            mean = buffers["posterior_mean_coef1"][t] * x0 + buffers["posterior_mean_coef2"][t] * x
            noise = torch.randn(x.shape, generator=generator) if t > 0 else torch.zeros_like(x)
            x = mean + (0.5 * buffers["posterior_log_variance_clipped"][t]).exp() * noise
            step_s.append(time.perf_counter() - step_start)
    return Run(x.numpy(), step_s, unet_s, time.perf_counter() - started)


@contextlib.contextmanager
def memory_growth(pids: list[int]) -> Iterator[dict]:
    """How far the resident memory of some processes rose above where it stood (MiB): VmHWM reset, then read."""
    before = 0
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        before += _status_kib(pid, "VmRSS")
    figures = {}
    yield figures
    figures["rss_growth_mib"] = (sum(_status_kib(pid, "VmHWM") for pid in pids) - before) / 1024


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def process_tree(pid: int) -> list[int]:
    """A process and its descendants (Triton's python backend runs models in stub processes)."""
    found = [pid]
    with contextlib.suppress(FileNotFoundError):  # the process ended meanwhile
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                children = (task / "children").read_text().split()
            except FileNotFoundError:  # a thread that ended between the listing and the read
                continue
            for child in children:
                found += process_tree(int(child))
    return found


PROGRESS_BYTES = 8  # the progress tensor of the server-side loop: two int32


def bytes_per_step(model: ServedModel) -> dict[str, int]:
    """Bytes one step moves for one sample (computed from the tensor shapes)."""
    voxels = int(np.prod(model.preset.image.grid))
    image = model.preset.out_channels * voxels * 4
    condition = len(model.preset.condition.labels) * voxels * 4
    return {
        "reference": 0,
        "onnxruntime-stock": 0,
        "onnxruntime": 0,
        "openvino": 0,
        "triton-network": 2 * image + condition + 4,
        "triton-shm": 2 * image + 4,
        "triton-shm once per volume": condition,
        "triton-server-loop": PROGRESS_BYTES,
        "triton-server-loop once per volume": condition + image,
    }


def bytes_per_volume(moved: dict[str, int], steps: int) -> dict[str, int]:
    """Tensor bytes one volume moves between client and server (over gRPC, or through shared memory for shm)."""
    return {
        name: steps * per_step + moved.get(f"{name} once per volume", 0)
        for name, per_step in moved.items()
        if not name.endswith("once per volume")
    }


def measure_grid(
    side: int, steps: int, repeats: int, backends: list[str], folder: Path, link: Link | None = None
) -> dict:
    model = demo_at_grid(side, folder)
    image = model.preset.image
    labels, _ = make_phantom(np.random.default_rng(0), image.mask_shape, image.voxel_size_mm[0])
    condition = ModelGrid(image.mask_shape, np.diag([*image.voxel_size_mm, 1.0]), model.preset).condition(labels)
    with contextlib.ExitStack() as stack:
        runners = {}
        if "reference" in backends:
            unet = load_checkpoint(DEMO_CHECKPOINT, model.preset).unet.eval()
            runners["reference"] = lambda seed: reference_loop(unet, model, condition, steps, seed)
        in_process = {
            "onnxruntime-stock": StockOnnxRuntimeDenoiser,
            "onnxruntime": OnnxRuntimeDenoiser,
            "openvino": lambda path: OpenVinoDenoiser(path, Precision.FP32, model.preset.schedule.timesteps),
        }
        for name, make in in_process.items():
            if name in backends:
                denoiser = make(model.onnx_path)
                runners[name] = lambda seed, d=denoiser: our_loop(d, model, condition, steps, seed)
        if any(b.startswith("triton") for b in backends):
            where = {"address": link.server_address, "prefix": link.prefix} if link else {}
            server = stack.enter_context(
                LocalTriton(model.folder.parent, log_path=folder / f"triton-{side}.log", **where)
            )
            for backend in (b for b in backends if b in ("triton-network", "triton-shm")):
                denoiser = TritonDenoiser(server.url, model, transport=backend.removeprefix("triton-"))
                runners[backend] = lambda seed, d=denoiser: our_loop(d, model, condition, steps, seed)
            if "triton-server-loop" in backends:
                loop = TritonServerLoop(TritonDenoiser(server.url, model, transport="network"))
                runners["triton-server-loop"] = lambda seed: server_loop(loop, model, condition, steps, seed)
        for run in runners.values():  # warm-up: sessions, connections, the server's first batch
            run(seed=0)
        runs, growth = {name: [] for name in runners}, {name: 0.0 for name in runners}
        for repeat in range(repeats):
            order = list(runners)[repeat % len(runners) :] + list(runners)[: repeat % len(runners)]
            for name in order:
                pids = [os.getpid(), *(process_tree(server.process.pid) if name.startswith("triton") else [])]
                with memory_growth(pids) as figures:
                    runs[name].append(runners[name](seed=1))
                growth[name] = max(growth[name], figures["rss_growth_mib"])
    return summarise(side, steps, repeats, runs, growth, bytes_per_step(model))


def unet_share_outside(run: Run) -> list[float]:
    """Per step, the share of its time spent outside the UNet call (unknown for the server-side loop)."""
    return [1 - u / s for s, u in zip(run.step_s[1:], run.unet_s[1:])]


def summarise(side: int, steps: int, repeats: int, runs: dict[str, list[Run]], growth: dict, moved: dict) -> dict:
    result = {
        "grid": side,
        "steps": steps,
        "repeats": repeats,
        "backends": {},
        "shm_condition_bytes_once": moved["triton-shm once per volume"],
    }
    for name, backend_runs in runs.items():
        steps_s = [s for r in backend_runs for s in r.step_s[1:]]  # the first step also pays the run's setup
        outside = [share for r in backend_runs for share in unet_share_outside(r)]
        volumes = [r.volume_s for r in backend_runs]
        result["backends"][name] = {
            "step_ms_median": 1e3 * statistics.median(steps_s),
            "step_ms_iqr": 1e3 * float(np.subtract(*np.percentile(steps_s, [75, 25]))),
            "volume_s_median": statistics.median(volumes),
            "volume_s_min": min(volumes),
            "volume_s_max": max(volumes),
            "outside_unet_share": statistics.median(outside) if outside else None,
            "rss_growth_mib": growth[name],
            "bytes_per_step": moved[name],
            "bytes_per_volume": bytes_per_volume(moved, steps)[name],
        }
    for base in ("reference", "onnxruntime"):
        if base in result["backends"]:
            for figures in result["backends"].values():
                figures[f"step_ratio_vs_{base}"] = (
                    figures["step_ms_median"] / result["backends"][base]["step_ms_median"]
                )
                figures[f"volume_ratio_vs_{base}"] = (
                    figures["volume_s_median"] / result["backends"][base]["volume_s_median"]
                )
    # Our loop gives one image whatever runs it; each runtime computes the graph to its own round-off.
    for name in runs.keys() - {"reference"}:
        base = SERVED_RUNTIME if name.startswith("triton") else "onnxruntime"
        if base in runs and name != base:
            difference = np.abs(runs[name][-1].image - runs[base][-1].image).max()
            result["backends"][name][f"max_abs_diff_vs_{base}"] = float(difference)
    return result


def table(results: list[dict]) -> str:
    lines = [
        "| grid | loop | ms/step (median ± IQR) | s/volume (median, min-max) | outside UNet | step ratio vs "
        "reference | step ratio vs onnxruntime | volume ratio vs onnxruntime | MiB moved/step | MiB moved/volume | "
        "RSS growth MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, f in r["backends"].items():
            ratios = [
                f.get(key)
                for key in ("step_ratio_vs_reference", "step_ratio_vs_onnxruntime", "volume_ratio_vs_onnxruntime")
            ]
            lines.append(
                f"| {r['grid']}³ | {name} | {f['step_ms_median']:.1f} ± {f['step_ms_iqr']:.1f} | "
                f"{f['volume_s_median']:.2f} ({f['volume_s_min']:.2f}-{f['volume_s_max']:.2f}) | "
                + ("-" if f["outside_unet_share"] is None else f"{100 * f['outside_unet_share']:.1f}%")
                + " | "
                + " | ".join("-" if v is None else f"{v:.3f}" for v in ratios)
                + f" | {f['bytes_per_step'] / 2**20:.2f} | {f['bytes_per_volume'] / 2**20:.2f} | "
                f"{f['rss_growth_mib']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sampling_loop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[32, 64], help="cube sides, multiples of 4")
    parser.add_argument("--steps", type=int, default=20, help="steps per volume")
    parser.add_argument("--repeats", type=int, default=5, help="volumes per loop and grid")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--link-rate", help="serve Triton behind a link of this rate (tc syntax, e.g. 100mbit; root)")
    args = parser.parse_args(argv)
    if args.link_rate:
        args.backends = [b for b in args.backends if b != "triton-shm"]  # no shared memory across a link
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        link = stack.enter_context(limited_link(args.link_rate)) if args.link_rate else None
        results = [
            measure_grid(side, args.steps, args.repeats, args.backends, Path(folder), link) for side in args.grids
        ]
    header = (
        f"{platform.node()}, {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}: demo model, "
        f"{args.steps} steps a volume, batch 1, {args.repeats} volumes per loop (after one warm-up), "
        f"Triton {'behind a ' + args.link_rate + ' link' if args.link_rate else 'on loopback'}"
    )
    print(header)
    print(table(results))
    print(
        "MiB moved/step: tensor bytes over gRPC (network, server-loop) or through shared memory (shm; the condition "
        "goes in once per volume, and for server-loop the volume comes out once); RSS growth: peak resident memory "
        "above the level before the run, client + server"
    )
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
