"""Check one synthesis result folder: what scripts/container_check.sh runs on the container's output.

    python -m harness.check_output mask OUT/head.nii.gz                      # write the check's phantom mask
    python -m harness.check_output verify OUT/head.nii.gz OUT/result/head [--reference HOST_RESULT/head] [--backend B]
        [--random-weights]

`verify` prints one line per finding and exits 1 if any: the files are there, the volume lies on the mask's
grid, holds finite values in the model range, draws the head the mask asks for (brain Dice, as the app tests; not
with --random-weights, for a model that was never trained), and, with --reference, equals a run of the same settings
outside the container.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from meddpm.imaging.phantom_heads import BRAIN, dice, make_phantom, segment

MASK_RNG_SEED = 2024  # the phantom of tests/test_app.py's quality test; with --seed 1 its brain Dice is > 0.8
MIN_BRAIN_DICE = 0.8
REFERENCE_TOLERANCE = 1e-5


def write_mask(path: Path) -> Path:
    mask, _ = make_phantom(np.random.default_rng(MASK_RNG_SEED), (32, 32, 32), 6.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask, np.diag([6.0, 6.0, 6.0, 1.0])), path)
    return path


def problems(
    mask_path: Path,
    folder: Path,
    reference: Path | None = None,
    figures: dict | None = None,
    backend: str = "openvino (fp32)",
    trained: bool = True,
) -> list[str]:
    """What is wrong with one mask's result folder (empty when it is right); `figures` gets what was measured."""
    figures = {} if figures is None else figures
    expected = {"sample_0.nii.gz", "preview.png", "record.json"}
    found = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if not expected <= found:
        return [f"{folder}: missing {sorted(expected - found)}"]
    mask = nib.load(mask_path)
    image = nib.load(folder / "sample_0.nii.gz")
    data = image.get_fdata()
    found_problems = []
    if image.shape != mask.shape or not np.allclose(image.affine, mask.affine, atol=1e-5):
        found_problems.append(f"grid {image.shape} {image.affine.tolist()} is not the mask's {mask.shape}")
    elif not np.isfinite(data).all() or data.min() < -1 or data.max() > 1 or data.std() < 0.05:
        found_problems.append(
            f"values not a synthetic image in [-1, 1]: min {data.min()}, max {data.max()}, std {data.std()}"
        )
    elif trained:
        figures["brain_dice"] = dice(segment(data), np.asarray(mask.dataobj), BRAIN)
        if figures["brain_dice"] < MIN_BRAIN_DICE:
            found_problems.append(
                f"brain Dice {figures['brain_dice']:.3f} < {MIN_BRAIN_DICE}: not the head the mask asks for"
            )
    record = json.loads((folder / "record.json").read_text())
    if record.get("backend") != backend or not record["model"].get("verification_passed"):
        found_problems.append(
            f"record.json: backend {record.get('backend')!r} (expected {backend!r}) or the model "
            f"is not a verified export"
        )
    if reference is not None:
        other = nib.load(reference / "sample_0.nii.gz").get_fdata()
        figures["max_difference"] = float(np.abs(other - data).max()) if other.shape == data.shape else float("inf")
        if figures["max_difference"] > REFERENCE_TOLERANCE:
            found_problems.append(
                f"differs from the reference run {reference} by up to {figures['max_difference']:.3g}"
            )
    return found_problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.check_output", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("mask").add_argument("path", type=Path)
    verify = commands.add_parser("verify")
    verify.add_argument("mask", type=Path)
    verify.add_argument("folder", type=Path)
    verify.add_argument("--reference", type=Path)
    verify.add_argument("--backend", default="openvino (fp32)", help="record.json's backend, e.g. 'triton NAME (shm)'")
    verify.add_argument("--random-weights", action="store_true", help="the model is untrained: no brain Dice")
    args = parser.parse_args(argv)
    if args.command == "mask":
        print(write_mask(args.path))
        return 0
    figures = {}
    found = problems(args.mask, args.folder, args.reference, figures, args.backend, not args.random_weights)
    for problem in found:
        print(f"FAIL {problem}")
    if not found:
        print(
            f"OK {args.folder}: on the mask's grid"
            + (f", brain Dice {figures['brain_dice']:.3f} (>= {MIN_BRAIN_DICE})" if "brain_dice" in figures else "")
            + (
                f", equal to {args.reference} (max difference {figures['max_difference']:.3g})"
                if args.reference
                else ""
            )
        )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
