"""Mask fidelity and diversity of a phantom-trained model, per scheduler and step count.

    python -m benchmarks.quality --repository model_repository --masks 8 --json output/quality.json

Unseen phantom masks are synthesised with each scheduler; each synthetic image is segmented back by the
phantoms' tissue intensity bands and compared with its mask (Dice per label, as Med-DDPM's paper does with a
segmentation network). The same segmentation of the phantoms' own ground-truth images gives the ceiling.
Diversity is the mean absolute difference between two samples of one mask, inside the head.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from meddpm.denoisers import OnnxRuntimeDenoiser
from meddpm.geometry import ModelGrid, condition_channels
from meddpm.phantoms import BRAIN, TUMOUR, dice, make_phantom, segment
from meddpm.sampling import default_steps, sample
from meddpm.served_model import find_model

DEFAULT_RUNS = ("ddpm:250", "ddim", "dpmpp2m", "deis")


def evaluate(repository: Path, model_name: str | None, masks: int, seed: int, runs: list[str]) -> dict:
    model = find_model(repository, model_name)
    preset = model.preset
    denoiser = OnnxRuntimeDenoiser(model.onnx_path)
    rng = np.random.default_rng(seed)
    affine = np.diag([*preset.image.voxel_size_mm, 1.0])
    phantoms = [make_phantom(rng, preset.image.mask_shape, preset.image.voxel_size_mm[0]) for _ in range(masks)]
    grid = ModelGrid(preset.image.mask_shape, affine, preset)

    def scores(images_and_masks):
        brain = [dice(segment(image), mask, BRAIN) for image, mask in images_and_masks]
        tumour = [dice(segment(image), mask, TUMOUR) for image, mask in images_and_masks if (mask == TUMOUR).any()]
        return {"dice_brain": _stats(brain), "dice_tumour": _stats(tumour)}

    results = {"model": model.name, "masks": masks, "seed": seed,
               "ground_truth_ceiling": scores([(image, mask) for mask, image in phantoms]), "runs": []}
    for run in runs:
        name, _, steps_text = run.partition(":")
        steps = int(steps_text) if steps_text else default_steps(name, preset.schedule)
        started = time.monotonic()
        pairs, diversity = [], []
        for index, (mask, _) in enumerate(phantoms):
            condition = condition_channels(grid.labels_to_network(mask), preset)
            images = sample(denoiser, condition, preset.out_channels, name, steps, preset.schedule,
                            seeds=[seed * 1000 + 2 * index, seed * 1000 + 2 * index + 1])
            on_mask_grid = [grid.image_from_network(image)[0] for image in images]
            pairs += [(image, mask) for image in on_mask_grid]
            head = mask > 0
            diversity.append(float(np.abs(on_mask_grid[0] - on_mask_grid[1])[head].mean()))
        entry = {"scheduler": name, "steps": steps, **scores(pairs), "diversity": _stats(diversity),
                 "seconds": round(time.monotonic() - started, 1)}
        results["runs"].append(entry)
        print(_row(entry), flush=True)
    return results


def _stats(values: list[float]) -> dict:
    return {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4), "n": len(values)} if values else {}


def _row(entry: dict) -> str:
    def fmt(s):
        return f"{s['mean']:.3f} ± {s['std']:.3f}" if s else "-"

    return (f"| {entry['scheduler']} | {entry['steps']} | {fmt(entry['dice_brain'])} | {fmt(entry['dice_tumour'])} | "
            f"{fmt(entry['diversity'])} | {entry['seconds']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model-name")
    parser.add_argument("--masks", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="SCHEDULER[:STEPS] ...")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print("| scheduler | steps (UNet calls) | Dice brain | Dice tumour | diversity | seconds |")
    print("|---|---|---|---|---|---|")
    results = evaluate(args.repository, args.model_name, args.masks, args.seed, args.runs)
    ceiling = results["ground_truth_ceiling"]
    print(f"| ground-truth phantom images | - | {ceiling['dice_brain']['mean']:.3f} | {ceiling['dice_tumour']['mean']:.3f} | - | - |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
