"""The heads each demo model is trained on, and how its synthetic images are segmented back, by preset name.

    python -m meddpm.imaging.demo_heads --preset mni152-demo --out DIR --count N --seed S   # held-out masks

Training (training/train_demo.py) draws its pairs here; the demo and the quality benchmarks draw held-out masks and
score synthetic images with the same source's `segment`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from meddpm.errors import ConfigurationError
from meddpm.imaging import phantom_heads, template_heads
from meddpm.model.presets import get_preset

HeadMaker = Callable[[np.random.Generator, tuple[int, int, int], float], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class HeadSource:
    """Random (mask, image) pairs on a preset's grid, the segmentation that reads labels back from an image drawn for
    a mask, the names of the labels it scores, how its mask files are named, and, where its masks are finer than
    Med-DDPM's whole-head convention, the map to it (training shows the model some masks so, to take Med-DDPM's)."""

    make: HeadMaker
    segment: Callable[[np.ndarray, np.ndarray], np.ndarray]
    labels: dict[str, int]
    file_prefix: str
    whole_head: Callable[[np.ndarray], np.ndarray] | None = None


HEAD_SOURCES = {
    "demo": HeadSource(
        phantom_heads.make_phantom,
        lambda image, mask: phantom_heads.segment(image),
        {"brain": phantom_heads.BRAIN, "tumour": phantom_heads.TUMOUR},
        "phantom",
    ),
    "mni152-demo": HeadSource(
        template_heads.make_template_head,
        template_heads.segment,
        {
            "head": template_heads.HEAD,
            "tumour": template_heads.TUMOUR,
            "fluid": template_heads.CEREBROSPINAL_FLUID,
            "grey matter": template_heads.GREY_MATTER,
            "white matter": template_heads.WHITE_MATTER,
        },
        "mni152",
        template_heads.whole_head,
    ),
}


def head_source(preset_name: str) -> HeadSource:
    """The heads the `preset_name` demo model was trained on."""
    if preset_name not in HEAD_SOURCES:
        raise ConfigurationError(
            f"preset '{preset_name}' has no synthetic heads to train or score on; the demo presets are "
            f"{', '.join(sorted(HEAD_SOURCES))}"
        )
    return HEAD_SOURCES[preset_name]


def write_masks(
    source: HeadSource, folder: Path, count: int, seed: int, shape: tuple[int, int, int], voxel_mm: float
) -> list[Path]:
    """Save `count` masks of `source` as NIfTI (RAS, voxel_mm, centred on the scanner origin) in `folder`.

    Drawn from `numpy.random.default_rng(seed)`, a stream that training (which draws from `[seed, step]`) never
    uses: these masks are held out."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * voxel_mm
    paths = []
    for index in range(count):
        mask, _ = source.make(rng, shape, voxel_mm)
        path = folder / f"{source.file_prefix}_{index:02d}.nii.gz"
        nib.save(nib.Nifti1Image(mask, affine), path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description="Write held-out head masks on a demo preset's grid.")
    parser.add_argument("--preset", choices=sorted(HEAD_SOURCES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    image = get_preset(args.preset).image
    for path in write_masks(
        head_source(args.preset), args.out, args.count, args.seed, image.mask_shape, image.voxel_size_mm[0]
    ):
        print(path)


if __name__ == "__main__":
    main()
