"""One UNet step on a GPU in PyTorch, per numeric and compilation variant, against FP32: time, accuracy, memory.

    python -m benchmarks.gpu_unet [--preset whole-head] [--grid 128] [--variants ...] [--json FILE]

For an H100/H200 machine (its image has CUDA PyTorch but no TensorRT or onnxruntime-gpu): the preset's UNet with
random weights (scale 0.02, Med-DDPM layout) at the full grid, batch 1. Variants, each timed with CUDA events
after warm-up and compared with the FP32 output on the same inputs:
- fp32: TF32 off (the reference); tf32: TF32 matmul and convolutions;
- fp16, bf16: autocast; normalisation stays FP32 (GroupNorm32 computes in float32, as Med-DDPM's does);
- fp16-channels-last: fp16 with channels-last 3D memory format;
- fp16-compile: fp16 with torch.compile; fp16-cuda-graph: the compiled graph replayed as a CUDA graph
  (torch.compile mode "reduce-overhead").
The floor for a 128^3 whole-head call is about 28 ms (5.5 TFLOP at ~194 TFLOP/s of cuDNN 3D FP16 convolution).
`--device cpu --preset demo --grid 32` runs the variants a CPU has (fp32, bf16, channels-last) as a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.random_weights import random_unet
from meddpm.model.presets import get_preset
from meddpm.model.unet import ConditionalDenoiser

FLOOR_MS_128 = 28.0
CUDA_ONLY = {"tf32", "fp16", "fp16-channels-last", "fp16-compile", "fp16-cuda-graph"}
VARIANTS = ("fp32", "tf32", "fp16", "bf16", "channels-last", "fp16-channels-last", "fp16-compile", "fp16-cuda-graph")


def random_model(preset_name: str, device: str) -> ConditionalDenoiser:
    return ConditionalDenoiser(random_unet(get_preset(preset_name))).eval().to(device)


def variant_call(name: str, model: ConditionalDenoiser, device: str) -> Callable[..., torch.Tensor]:
    """A function (noisy_image, condition, timestep) -> noise running the model as the variant says."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    dtype = torch.float16 if name.startswith("fp16") else torch.bfloat16 if name == "bf16" else None
    channels_last = "channels-last" in name
    net = (
        model.to(memory_format=torch.channels_last_3d)
        if channels_last
        else model.to(memory_format=torch.contiguous_format)
    )
    if name == "fp16-compile":
        net = torch.compile(net)
    elif name == "fp16-cuda-graph":
        net = torch.compile(net, mode="reduce-overhead")

    def call(noisy_image: torch.Tensor, condition: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if channels_last:
            noisy_image = noisy_image.contiguous(memory_format=torch.channels_last_3d)
            condition = condition.contiguous(memory_format=torch.channels_last_3d)
        autocast = torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            return net(noisy_image, condition, timestep).float()

    return call


def measure(
    name: str, call: Callable, inputs: tuple, reference: torch.Tensor | None, device: str, repeats: int
) -> dict:
    for _ in range(3):  # warm-up: cuDNN autotuning, compilation, graph capture
        output = call(*inputs)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            output = call(*inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            output = call(*inputs)
            times.append(1e3 * (time.perf_counter() - started))
    figures = {"variant": name, "ms_median": statistics.median(times), "ms_min": min(times), "ms_max": max(times)}
    if reference is not None:
        scale = reference.abs().max().item()
        figures["max_rel_error_vs_fp32"] = (output - reference).abs().max().item() / scale
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_unet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="whole-head")
    parser.add_argument("--grid", type=int, default=128, help="cube side of the input")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants if args.device == "cuda" or v not in CUDA_ONLY]
    model = random_model(args.preset, args.device)
    preset = get_preset(args.preset)
    generator = torch.Generator().manual_seed(1)
    shape = (args.grid,) * 3
    inputs = (
        torch.randn((1, preset.out_channels, *shape), generator=generator).to(args.device),
        (torch.rand((1, len(preset.condition.labels), *shape), generator=generator) > 0.5).float().to(args.device),
        torch.tensor([125.0], device=args.device),
    )
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    rows, reference = [], None
    for name in ["fp32", *(v for v in variants if v != "fp32")]:
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        figures = measure(name, variant_call(name, model, args.device), inputs, reference, args.device, args.repeats)
        if name == "fp32":
            reference = variant_call("fp32", model, args.device)(*inputs)
        if args.device == "cuda":
            figures["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        rows.append(figures)
    print(
        f"{device_name}, torch {torch.__version__}, preset {args.preset} at {args.grid}^3, batch 1, "
        f"{args.repeats} timed calls after warm-up"
    )
    print(
        "| variant | ms/step median (min-max) | ratio to fp32 | x floor (28 ms at 128^3) | max rel. error vs fp32 "
        "| 250 steps s | 20 steps s | peak GPU MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['ms_median']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}) | "
            f"{r['ms_median'] / rows[0]['ms_median']:.2f} | "
            f"{r['ms_median'] / FLOOR_MS_128 if args.grid == 128 else float('nan'):.2f} | "
            f"{r.get('max_rel_error_vs_fp32', 0.0):.1e} | {0.25 * r['ms_median']:.1f} | {0.02 * r['ms_median']:.2f} | "
            f"{r.get('peak_gpu_mib', float('nan')):.0f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"device": device_name, "preset": args.preset, "grid": args.grid, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
