"""Procedural head phantoms: a label mask and a matching MR-like image, and the measures that compare them.

Arrays are (X, Y, Z) in RAS orientation, like a nibabel-loaded Med-DDPM mask. Labels: 0 background,
1 brain, 2 tumour. Each tissue has its own intensity band (model range [-1, 1], T1-like contrast), so a
synthetic image can be segmented back by thresholds and compared with the mask it was made from.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BACKGROUND, BRAIN, TUMOUR = 0, 1, 2
# Tissue intensities in the model range; brain is grey matter outside, white matter inside.
INTENSITY = {"background": -1.0, "skull": -0.75, "scalp": -0.2, "grey": 0.2, "white": 0.45, "tumour": 0.9}
# Thresholds that segment an image back into labels (midpoints between the bands above).
BRAIN_BAND = (0.0, 0.7)  # grey..white
TUMOUR_MIN = 0.7


def make_phantom(
    rng: np.random.Generator, shape: tuple[int, int, int], voxel_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """One random head: (mask uint8, image float32), both of `shape`, voxels of `voxel_mm`."""
    grid = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * voxel_mm for n in shape], indexing="ij"))
    centre = rng.uniform(-1.0, 1.0, 3) * voxel_mm
    radii = np.array([72.0, 90.0, 80.0]) * rng.uniform(0.88, 1.05) * rng.uniform(0.95, 1.05, 3)
    smooth = _smooth_field(rng, shape, sigma=4.0 * 6.0 / voxel_mm)
    # Normalised ellipsoidal radius, wobbled by a smooth field so that no two heads are alike.
    r = np.sqrt((((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0)) + 0.04 * smooth

    scalp, skull, brain = r < 1.0, r < 0.9, r < 0.8
    white = r < 0.8 - 0.16 + 0.05 * _smooth_field(rng, shape, sigma=2.0 * 6.0 / voxel_mm)
    image = np.full(shape, INTENSITY["background"], dtype=np.float32)
    image[scalp] = INTENSITY["scalp"]
    image[skull] = INTENSITY["skull"]
    image[brain] = INTENSITY["grey"]
    image[brain & white] = INTENSITY["white"]
    mask = np.where(brain, BRAIN, BACKGROUND).astype(np.uint8)

    if rng.random() < 0.75:
        tumour = _tumour(rng, grid, brain, voxel_mm)
        image[tumour] = INTENSITY["tumour"]
        mask[tumour] = TUMOUR

    texture = 0.04 * _smooth_field(rng, shape, sigma=1.0) * (mask > 0)
    image = ndimage.gaussian_filter(image + texture, sigma=0.5 * 6.0 / voxel_mm)
    image += rng.normal(0.0, 0.02, shape)
    return mask, np.clip(image, -1.0, 1.0).astype(np.float32)


def segment(image: np.ndarray) -> np.ndarray:
    """Labels of a phantom-like image by its intensity bands (brain must lie inside the skull)."""
    labels = np.zeros(image.shape, dtype=np.uint8)
    brainlike = (image > BRAIN_BAND[0]) & (image <= BRAIN_BAND[1])
    labels[brainlike] = BRAIN
    labels[image > TUMOUR_MIN] = TUMOUR
    return labels


def dice(labels_a: np.ndarray, labels_b: np.ndarray, label: int) -> float:
    """Dice overlap of one label between two label volumes (1.0 when both lack it)."""
    a, b = labels_a == label, labels_b == label
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def _tumour(rng: np.random.Generator, grid: np.ndarray, brain: np.ndarray, voxel_mm: float) -> np.ndarray:
    inside = np.argwhere(ndimage.binary_erosion(brain, iterations=max(1, int(round(12.0 / voxel_mm)))))
    if len(inside) == 0:
        return np.zeros(brain.shape, dtype=bool)
    centre = grid[(slice(None), *inside[rng.integers(len(inside))])]
    radii = rng.uniform(12.0, 30.0, 3)
    r = np.sqrt((((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0))
    return (r < 1.0) & brain


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=sigma)
    return field / (np.abs(field).max() + 1e-8)
