"""A PNG preview: sagittal, coronal and axial mid-slices of the mask (top) and each image channel (below)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from nibabel import orientations
from PIL import Image

from meddpm.imaging.geometry import reorder, voxel_sizes
from meddpm.imaging.masks import LabelMask
from meddpm.model.tensors import IMAGE_RANGE

PANEL_PIXELS = 192  # each slice is scaled (nearest neighbour) to about this height
LABEL_COLOURS = np.array(
    [[0, 0, 0], [70, 130, 180], [230, 60, 50], [250, 200, 40], [80, 190, 90], [180, 90, 200]], dtype=np.uint8
)


def write_preview(path: Path, mask: LabelMask, image: np.ndarray, channel_names: tuple[str, ...]) -> None:
    """image: (C, X, Y, Z) on the mask's grid, model range (IMAGE_RANGE)."""
    to_ras = orientations.ornt_transform(orientations.io_orientation(mask.affine), orientations.axcodes2ornt("RAS"))
    ras_zooms = reorder(voxel_sizes(mask.affine), to_ras)
    labels = orientations.apply_orientation(mask.labels, to_ras)
    rows = [_row(labels, ras_zooms, lambda s: LABEL_COLOURS[s % len(LABEL_COLOURS)])]
    for channel in range(len(channel_names)):
        volume = orientations.apply_orientation(image[channel], to_ras)
        rows.append(_row(volume, ras_zooms, _grey))
    width = max(r.shape[1] for r in rows)
    canvas = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows])
    Image.fromarray(canvas).save(path)


def _grey(values: np.ndarray) -> np.ndarray:
    low, high = IMAGE_RANGE
    grey = ((np.clip(values, low, high) - low) * (255.0 / (high - low))).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def _row(volume: np.ndarray, zooms: np.ndarray, colour) -> np.ndarray:
    """Sagittal, coronal, axial mid-slices of a RAS volume, superior/anterior up, at true aspect."""
    x, y, z = (s // 2 for s in volume.shape)
    slices = [
        (volume[x, :, :], zooms[1], zooms[2]),
        (volume[:, y, :], zooms[0], zooms[2]),
        (volume[:, :, z], zooms[0], zooms[1]),
    ]
    panels = []
    for plane, horizontal_mm, vertical_mm in slices:
        rgb = colour(np.rot90(plane))  # first axis becomes horizontal, second axis points up
        height = PANEL_PIXELS
        width = max(1, round(height * plane.shape[0] * horizontal_mm / (plane.shape[1] * vertical_mm)))
        panels.append(np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.NEAREST)))
    return np.concatenate(panels, axis=1)
