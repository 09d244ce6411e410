"""Export figures for the released presets at full size, with random weights in Med-DDPM's layout.

    python -m benchmarks.export_presets [--presets whole-head brats fast-sampling]

For each preset: a randomised UNet is saved in Med-DDPM's `ema` checkpoint layout and put through the same
path as `python -m export` (load, ONNX export, verification, repository), timing each stage. Prints a table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.random_weights import random_unet
from export import onnx_graph
from meddpm.model.checkpoint import load_checkpoint, save_meddpm_checkpoint
from meddpm.model.presets import get_preset
from meddpm.model.unet import ConditionalDenoiser


def measure(name: str, folder: Path) -> dict:
    preset = get_preset(name)
    unet = random_unet(preset)
    checkpoint = folder / f"{name}.pt"
    save_meddpm_checkpoint(checkpoint, unet, preset, step=0)
    started = time.monotonic()
    model = ConditionalDenoiser(load_checkpoint(checkpoint, preset).unet)
    loaded = time.monotonic()
    onnx_path = folder / f"{name}.onnx"
    onnx_graph.export_onnx(model, preset, onnx_path)
    exported = time.monotonic()
    verification = onnx_graph.verify_onnx(onnx_path, model, preset)
    return {
        "preset": name,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "load_s": loaded - started,
        "export_s": exported - loaded,
        "verify_s": verification.seconds,
        "grids": verification.cases,
        "max_abs": verification.max_abs_error,
        "max_rel": verification.max_relative_error,
        "passed": verification.passed,
        "onnx_mb": onnx_path.stat().st_size / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["whole-head", "brats", "fast-sampling"])
    args = parser.parse_args()
    print(
        "| preset | parameters | load s | export s | verify s (grids) | max abs error | max relative error | ONNX MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for name in args.presets:
            r = measure(name, Path(work))
            grids = ", ".join("x".join(map(str, c.grid)) for c in r["grids"])
            print(
                f"| {name} | {r['parameters']:,} | {r['load_s']:.1f} | {r['export_s']:.1f} | "
                f"{r['verify_s']:.1f} ({grids}) | "
                f"{r['max_abs']:.1e} | {r['max_rel']:.1e} {'pass' if r['passed'] else 'FAIL'} | {r['onnx_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
