"""Mapping a label mask's voxel grid onto a preset's network grid, and synthetic images back.

Forward (mask -> network): reorient to the preset's orientation (nibabel), resample to the preset's voxel
size when it differs (nearest neighbour, so no label is invented), centre-pad or crop to the preset's grid,
then order the axes as the network expects. Backward (network -> mask grid) undoes each step in reverse,
resampling images with trilinear interpolation, so the output has the mask's exact shape and affine; what the
network grid does not cover is the preset's background intensity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from nibabel import orientations

from meddpm.errors import InputError
from meddpm.presets import Preset

VOXEL_SIZE_RTOL = 0.01  # voxel sizes closer than 1% to the preset's are used as they are
SINGULAR_RTOL = 1e-6  # an affine whose determinant is below this fraction of its voxel volume has collapsed axes


class ModelGrid:
    """The mapping between one mask grid (shape, affine) and a preset's network grid."""

    def __init__(self, shape: tuple[int, int, int], affine: np.ndarray, preset: Preset):
        self.preset = preset
        self.source_shape = tuple(int(s) for s in shape)
        source_ornt = orientations.io_orientation(affine)
        target_ornt = orientations.axcodes2ornt(tuple(preset.image.orientation))
        self._to_canonical = orientations.ornt_transform(source_ornt, target_ornt)
        self._from_canonical = orientations.ornt_transform(target_ornt, source_ornt)

        self.canonical_shape = tuple(int(s) for s in reorder(self.source_shape, self._to_canonical))
        canonical_zooms = reorder(voxel_sizes(affine), self._to_canonical)
        target_zooms = np.asarray(preset.image.voxel_size_mm, dtype=float)
        self.resampled = not np.allclose(canonical_zooms, target_zooms, rtol=VOXEL_SIZE_RTOL)
        self.resampled_shape = (
            tuple(max(1, int(round(s * z / t))) for s, z, t in zip(self.canonical_shape, canonical_zooms, target_zooms))
            if self.resampled
            else self.canonical_shape
        )
        self.offsets = tuple((t - r) // 2 for t, r in zip(preset.image.mask_shape, self.resampled_shape))

    @property
    def exact(self) -> bool:
        """True when no voxel is interpolated, padded or cropped on the way."""
        return not self.resampled and all(o == 0 for o in self.offsets)

    def labels_to_network(self, labels: np.ndarray) -> np.ndarray:
        """(X, Y, Z) label mask -> label volume on the network grid (D, H, W)."""
        canonical = orientations.apply_orientation(labels, self._to_canonical)
        if self.resampled:
            from monai.transforms import Resize  # imported here: MONAI's import is heavy and rarely needed

            resize = Resize(self.resampled_shape, mode="nearest-exact")
            canonical = np.asarray(resize(torch.from_numpy(canonical[None].astype(np.int16)))[0]).astype(labels.dtype)
        fitted = _place(canonical, self.preset.image.mask_shape, self.offsets)
        return self.network_axes(fitted)

    def image_from_network(self, image: np.ndarray) -> np.ndarray:
        """(C, D, H, W) network output -> (C, X, Y, Z) float32 on the mask's own grid."""
        channels = [self.network_axes(channel) for channel in image]  # the axis swap is its own inverse
        unfitted = np.stack([_place(c, self.resampled_shape, tuple(-o for o in self.offsets),
                                    fill=self.preset.image.background) for c in channels])
        if self.resampled:
            from monai.transforms import Resize

            resize = Resize(self.canonical_shape, mode="trilinear", anti_aliasing=True)
            unfitted = np.asarray(resize(torch.from_numpy(unfitted.astype(np.float32))))
        restored = [orientations.apply_orientation(c, self._from_canonical) for c in unfitted]
        return np.ascontiguousarray(np.stack(restored), dtype=np.float32)

    def network_axes(self, volume: np.ndarray) -> np.ndarray:
        """Swap between mask axis order and network axis order (the swap is its own inverse)."""
        return volume.transpose(2, 1, 0) if self.preset.image.axis_order == "reversed" else volume


def check_affine(where: Path | str, affine: np.ndarray) -> None:
    """Refuse a voxel-to-mm affine with NaN or infinite values, a zero voxel size or collapsed axes (InputError)."""
    fix = ("write the real geometry into the header (sform/qform, pixdim in mm), e.g. copy the header of the image "
           "the mask was drawn on")
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{where}: the header's voxel-to-mm transform holds NaN or infinite values, so the mask has "
                         f"no position or voxel size; {fix}")
    sizes = voxel_sizes(affine)
    if abs(np.linalg.det(affine[:3, :3])) <= SINGULAR_RTOL * np.prod(sizes):
        raise InputError(f"{where}: the header's voxel-to-mm transform is singular (voxel sizes "
                         f"{sizes_text(sizes)} mm: a zero voxel size, or axes that coincide); {fix}")


def sizes_text(values) -> str:
    """Per-axis sizes as 6x6x6."""
    return "x".join(f"{float(v):g}" for v in values)


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel size along each array axis, in mm."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def reorder(per_axis, transform: np.ndarray) -> np.ndarray:
    """Per-axis values (shape, voxel sizes) in the axis order that nibabel's `transform` produces."""
    out = np.zeros(len(per_axis))
    for axis, (new_axis, _flip) in enumerate(transform):
        out[int(new_axis)] = per_axis[axis]
    return out


def condition_channels(network_labels: np.ndarray, preset: Preset) -> np.ndarray:
    """One-hot condition channels (len(labels), D, H, W) in the preset's label order and scale."""
    one_hot = np.stack([network_labels == label for label in preset.condition.labels]).astype(np.float32)
    return 2.0 * one_hot - 1.0 if preset.condition.scale == "symmetric" else one_hot


def _place(volume: np.ndarray, shape: tuple[int, ...], offsets: tuple[int, ...], fill: float = 0) -> np.ndarray:
    """Copy `volume` into an array of `shape` filled with `fill`, at `offsets` (negative offsets crop)."""
    out = np.full(shape, fill, dtype=volume.dtype)
    src, dst = [], []
    for size_in, size_out, offset in zip(volume.shape, shape, offsets):
        start_in, start_out = max(0, -offset), max(0, offset)
        length = min(size_in - start_in, size_out - start_out)
        src.append(slice(start_in, start_in + length))
        dst.append(slice(start_out, start_out + length))
    out[tuple(dst)] = volume[tuple(src)]
    return out
