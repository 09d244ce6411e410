"""Mask fidelity and diversity of a demo model per scheduler and step count: the fast-sampling curve.

    python -m benchmarks.quality --repository model_repository --masks 16 --json output/quality.json

Unseen masks of the heads the model was trained on (meddpm/imaging/demo_heads.py: phantoms for `demo`, the
MNI152 template for `mni152-demo`) are synthesised by DDPM-250 (Med-DDPM's sampler, the reference) and by each
fast scheduler at each step count of `--steps`; each synthetic image is segmented back by the heads' intensity
model and compared with its mask (Dice per label, as Med-DDPM's paper does with a segmentation network). The same
segmentation of the heads' own ground-truth images gives the ceiling. Diversity is the mean absolute difference
between two samples of one mask, inside the head; the intensity distance is the Wasserstein-1 distance between the
intensities inside the head of a synthetic image and of that mask's ground-truth image (model range [-1, 1]): 0 when
the tissues come out in the proportions and brightness of the training heads, whatever their place.

Every run uses the same masks and seeds, so each sample has a DDPM-250 twin from the same initial noise: the
difference to DDPM-250 is reported per label as the mean paired difference with its standard error. A
scheduler's suggested default is its fewest steps whose mean Dice is within `--tolerance` of DDPM-250 on every
label.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import wasserstein_distance

from meddpm.backends.openvino_denoiser import OpenVinoDenoiser
from meddpm.imaging.demo_heads import HeadSource, head_source
from meddpm.imaging.masks import LabelMask
from meddpm.imaging.phantom_heads import dice
from meddpm.model.presets import Precision, Preset, Scheduler
from meddpm.model.served_model import find_model
from meddpm.sampling.loop import DenoiserLoop, calls_unet, step_alpha_bars
from meddpm.sampling.request import SamplingRequest
from meddpm.sampling.schedulers import make_scheduler
from meddpm.synthesis import SynthesisPipeline

REFERENCE = ("ddpm", 250)
FAST_SCHEDULERS = tuple(name for name in Scheduler if name != Scheduler.DDPM)


def evaluate(repository: Path, model_name: str | None, masks: int, seed: int, runs: list[tuple[str, int]]) -> dict:
    model = find_model(repository, model_name)
    denoiser = OpenVinoDenoiser(model.onnx_path, Precision.FP32, model.preset.schedule.timesteps)  # the app's, FP32
    pipeline = SynthesisPipeline(model, DenoiserLoop(denoiser), batch_size=2)
    source = head_source(model.preset.name)
    held_out = held_out_heads(model.preset, masks, seed)
    ceiling = per_sample_dice(source, [(head.image, head.mask.labels) for head in held_out])
    results = {
        "model": model.name,
        "labels": list(source.labels),
        "masks": masks,
        "samples_per_mask": 2,
        "seed": seed,
        "ground_truth_ceiling": {label: stats(values) for label, values in ceiling.items()},
        "runs": [],
    }
    labels = list(source.labels)
    print(_header(labels))
    reference = None
    for name, steps in runs:
        started = time.monotonic()
        scores, diversity, distance = synthesise_and_score(pipeline, source, held_out, name, steps, seed)
        reference = scores if (name, steps) == REFERENCE else reference
        solver = make_scheduler(name, model.preset.schedule, steps)
        entry = {
            "scheduler": name,
            "steps": steps,
            "unet_calls": sum(calls_unet(a, model.preset) for a in step_alpha_bars(solver)),
            "seconds": round(time.monotonic() - started, 1),
            **{f"dice_{label}": stats(values) for label, values in scores.items()},
            "diversity": stats(diversity),
            "intensity_distance": stats(distance),
        }
        if reference is not None:
            entry["vs_ddpm250"] = {label: paired_difference(scores[label], reference[label]) for label in source.labels}
        results["runs"].append(entry)
        print(_row(entry, labels), flush=True)
    return results


@dataclasses.dataclass(frozen=True)
class Head:
    mask: LabelMask
    image: np.ndarray  # the head's ground-truth image, on the mask's grid


def held_out_heads(preset: Preset, count: int, seed: int) -> list[Head]:
    """Heads the demo model never saw in training (drawn from `default_rng(seed)`; training draws from
    `[seed, step]`), at the preset's mask grid."""
    rng = np.random.default_rng(seed)
    affine = np.diag([*preset.image.voxel_size_mm, 1.0])
    make = head_source(preset.name).make
    heads = []
    for index in range(count):
        labels, image = make(rng, preset.image.mask_shape, preset.image.voxel_size_mm[0])
        heads.append(Head(LabelMask(f"head_{index}", labels, affine, f"head {index}"), image))
    return heads


def synthesise_and_score(
    pipeline: SynthesisPipeline, source: HeadSource, held_out: list[Head], scheduler: str, steps: int, seed: int
) -> tuple[dict[str, list[float]], list[float], list[float]]:
    """Two samples of each head (the same initial noise for the same seed, whatever runs the UNet): Dice per
    label and sample, each head's diversity (mean absolute difference of its two samples inside the head), and each
    sample's intensity distance to the head's ground-truth image."""
    pairs, diversity, distance = [], [], []
    for index, head in enumerate(held_out):
        synthesis = pipeline(head.mask, SamplingRequest(scheduler, steps, seed * 1000 + 2 * index, samples=2))
        on_mask_grid = [volume[0] for volume in synthesis.samples]
        labels = head.mask.labels
        pairs += [(image, labels) for image in on_mask_grid]
        diversity.append(float(np.abs(on_mask_grid[0] - on_mask_grid[1])[labels > 0].mean()))
        distance += [float(wasserstein_distance(image[labels > 0], head.image[labels > 0])) for image in on_mask_grid]
    return per_sample_dice(source, pairs), diversity, distance


def per_sample_dice(
    source: HeadSource, images_and_masks: list[tuple[np.ndarray, np.ndarray]]
) -> dict[str, list[float]]:
    """Dice per label and sample; NaN where the mask lacks the label (tumour-free heads)."""
    segmented = [(source.segment(image, mask), mask) for image, mask in images_and_masks]
    return {
        name: [dice(labels, mask, label) if (mask == label).any() else float("nan") for labels, mask in segmented]
        for name, label in source.labels.items()
    }


def suggested_defaults(results: dict, tolerance: float) -> dict[str, int]:
    """Per fast scheduler, its fewest steps whose mean Dice is within `tolerance` of DDPM-250 on every label."""
    picks = {}
    for entry in sorted(results["runs"], key=lambda e: e["steps"]):
        # A label with fewer than two paired samples (no tumour among the masks) has no mean and is not judged.
        close = "vs_ddpm250" in entry and all(d.get("mean", 0.0) >= -tolerance for d in entry["vs_ddpm250"].values())
        if entry["scheduler"] != REFERENCE[0] and close:
            picks.setdefault(entry["scheduler"], entry["steps"])
    return picks


def stats(values: list[float]) -> dict:
    values = [v for v in values if not np.isnan(v)]
    if not values:
        return {"n": 0}
    return {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4), "n": len(values)}


def paired_difference(values: list[float], reference: list[float]) -> dict:
    """Mean paired difference to the reference and its standard error (samples from the same initial noise)."""
    differences = np.array(values) - np.array(reference)
    differences = differences[~np.isnan(differences)]
    if len(differences) < 2:
        return {"n": len(differences)}
    return {
        "mean": round(float(differences.mean()), 4),
        "sem": round(float(differences.std(ddof=1) / np.sqrt(len(differences))), 4),
        "n": len(differences),
    }


def _header(labels: list[str]) -> str:
    columns = ["scheduler", "steps", "UNet calls", *(f"Dice {label}" for label in labels)]
    columns += [*(f"Δ {label} vs DDPM-250" for label in labels), "diversity", "intensity distance", "seconds"]
    return "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"


def _row(entry: dict, labels: list[str]) -> str:
    def spread(s):
        return f"{s['mean']:.3f} ± {s['std']:.3f}" if s["n"] else "-"

    def paired(label):
        d = entry.get("vs_ddpm250", {}).get(label, {})
        return (
            f"{d['mean']:+.3f} ± {d['sem']:.3f}" if d.get("n", 0) >= 2 and entry["scheduler"] != REFERENCE[0] else "-"
        )

    cells = [
        entry["scheduler"],
        entry["steps"],
        entry["unet_calls"],
        *(spread(entry[f"dice_{label}"]) for label in labels),
    ]
    cells += [*(paired(label) for label in labels), spread(entry["diversity"])]
    cells += [spread(entry["intensity_distance"]), entry["seconds"]]
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model-name")
    parser.add_argument("--masks", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--schedulers", nargs="+", choices=FAST_SCHEDULERS, default=list(FAST_SCHEDULERS))
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20, 25, 50], help="fast step counts")
    parser.add_argument("--tolerance", type=float, default=0.02, help="Dice a fast default may lose to DDPM-250")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = [REFERENCE, *((name, steps) for name in args.schedulers for steps in args.steps)]
    results = evaluate(args.repository, args.model_name, args.masks, args.seed, runs)
    ceiling = [f"{results['ground_truth_ceiling'][label]['mean']:.3f}" for label in results["labels"]]
    print("| ground-truth images | - | - | " + " | ".join(ceiling) + " | -" * (len(ceiling) + 3) + " |")
    results["suggested_defaults"] = suggested_defaults(results, args.tolerance)
    print(
        f"Δ: mean paired difference ± standard error. Fewest steps within {args.tolerance} of DDPM-250 on every "
        "label: " + (", ".join(f"{k} {v}" for k, v in results["suggested_defaults"].items()) or "none")
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
