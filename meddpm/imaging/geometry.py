"""Mapping a label mask's voxel grid onto a preset's network grid, and synthetic images back.

Forward (mask -> network): reorient to the preset's orientation (nibabel), resample to the preset's voxel
size when it differs (nearest neighbour, so no label is invented), centre-pad or crop to the preset's grid,
then order the axes as the network expects. Backward (network -> mask grid) undoes each step in reverse,
resampling images with trilinear interpolation, so the output has the mask's exact shape and affine; what the
network grid does not cover is the preset's background intensity.

A mask whose labels do not reach the network grid would give a meaningless image: `check_label_fit` refuses it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from nibabel import orientations

from meddpm.errors import InputError
from meddpm.model.presets import AxisOrder, ConditionScale, Preset

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM's patient axes to NIfTI's, and back (the flip is its own inverse)
VOXEL_SIZE_RTOL = 0.01  # voxel sizes closer than 1% to the preset's are used as they are
# Refused: a mask that loses more than this fraction of any label's voxels to the centre crop. Up to it, the crop
# takes at most a cap about 19 mm deep off one pole of a brain (70 mm half-axes), and the warning and record.json say
# so; beyond it, a sizeable part of a lobe is background in the image while the mask labels it brain, a wrong
# image-label pair (10% would be a 27 mm cap).
FIELD_OF_VIEW_LOSS_LIMIT = 0.05
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
        self.source_voxel_mm = tuple(float(z) for z in voxel_sizes(affine))
        canonical_zooms = reorder(self.source_voxel_mm, self._to_canonical)
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

    @property
    def anti_aliased(self) -> bool:
        """True when mapping images back shrinks an axis, so that MONAI smooths them first (the costly case)."""
        return any(r > c for r, c in zip(self.resampled_shape, self.canonical_shape))

    def labels_to_network(self, labels: np.ndarray) -> np.ndarray:
        """(X, Y, Z) label mask -> label volume on the network grid (D, H, W)."""
        return self._fit(self._resample_labels(labels))

    def condition(self, labels: np.ndarray) -> np.ndarray:
        """(X, Y, Z) label mask -> the network's condition channels (L, D, H, W), as the pipeline feeds them."""
        return condition_channels(self.labels_to_network(labels), self.preset)

    def fit_labels(self, labels: np.ndarray) -> LabelFit:
        """The mask's labels on the network grid, with how many voxels of each label got there."""
        resampled = self._resample_labels(labels)
        network = self._fit(resampled)
        return LabelFit(
            network,
            label_counts(labels),
            label_counts(resampled),
            label_counts(network),
            voxel_mm3=float(np.prod(self.source_voxel_mm)),
            model_voxel_mm3=float(np.prod(self.preset.image.voxel_size_mm)),
        )

    def _resample_labels(self, labels: np.ndarray) -> np.ndarray:
        """(X, Y, Z) labels -> canonical orientation at the preset's voxel size, before the centre pad or crop."""
        canonical = orientations.apply_orientation(labels, self._to_canonical)
        if not self.resampled:
            return canonical
        from monai.transforms import Resize  # imported here: MONAI's import is heavy and rarely needed

        resize = Resize(self.resampled_shape, mode="nearest-exact")
        return np.asarray(resize(torch.from_numpy(canonical[None].astype(np.int16)))[0]).astype(labels.dtype)

    def _fit(self, resampled: np.ndarray) -> np.ndarray:
        return self.network_axes(_place(resampled, self.preset.image.mask_shape, self.offsets))

    def image_from_network(self, image: np.ndarray) -> np.ndarray:
        """(C, D, H, W) network output -> (C, X, Y, Z) float32 on the mask's own grid."""
        channels = [self.network_axes(channel) for channel in image]  # the axis swap is its own inverse
        unfitted = np.stack(
            [
                _place(c, self.resampled_shape, tuple(-o for o in self.offsets), fill=self.preset.image.background)
                for c in channels
            ]
        )
        if self.resampled:
            from monai.transforms import Resize

            resize = Resize(self.canonical_shape, mode="trilinear", anti_aliasing=True)
            unfitted = np.asarray(resize(torch.from_numpy(unfitted.astype(np.float32))))
        restored = [orientations.apply_orientation(c, self._from_canonical) for c in unfitted]
        return np.ascontiguousarray(np.stack(restored), dtype=np.float32)

    def network_axes(self, volume: np.ndarray) -> np.ndarray:
        """Swap between mask axis order and network axis order (the swap is its own inverse)."""
        return volume.transpose(2, 1, 0) if self.preset.image.axis_order == AxisOrder.REVERSED else volume


@dataclasses.dataclass(frozen=True)
class LabelFit:
    """A mask's labels on the network grid, and how many voxels of each label present in the mask got there."""

    network_labels: np.ndarray  # (D, H, W)
    mask_voxels: dict[int, int]  # on the mask's grid
    resampled_voxels: dict[int, int]  # at the preset's voxel size, before the centre pad or crop
    network_voxels: dict[int, int]
    voxel_mm3: float  # one voxel of the mask
    model_voxel_mm3: float  # one voxel of the network grid

    @property
    def lost_to_voxel_size(self) -> list[int]:
        """Labels that vanish at the preset's voxel size or fill less than one of its voxels."""
        return [
            label
            for label, count in self.mask_voxels.items()
            if not self.resampled_voxels.get(label) or count * self.voxel_mm3 < self.model_voxel_mm3
        ]

    def outside_field_of_view(self) -> dict[int, float]:
        """Fraction of each label's voxels (at the preset's voxel size) that the centre crop leaves out."""
        lost = self.lost_to_voxel_size
        return {
            label: 1.0 - self.network_voxels.get(label, 0) / self.resampled_voxels[label]
            for label in self.mask_voxels
            if label not in lost
        }

    def labelled_outside_field_of_view(self) -> float:
        """Fraction of all labelled voxels (labels lost to the voxel size aside) that the centre crop leaves out."""
        kept = self.outside_field_of_view()
        total = sum(self.resampled_voxels[label] for label in kept)
        return 1.0 - sum(self.network_voxels.get(label, 0) for label in kept) / total if total else 0.0

    def record(self) -> dict:
        """For record.json's grid section."""
        per_label = {str(label): round(fraction, 4) for label, fraction in self.outside_field_of_view().items()}
        return {
            "labels_lost_to_voxel_size": self.lost_to_voxel_size,
            "fraction_outside_field_of_view": {
                "labelled": round(self.labelled_outside_field_of_view(), 4),
                **per_label,
            },
        }


def check_label_fit(where: str, grid: ModelGrid, fit: LabelFit) -> list[str]:
    """Refuse a mask whose labels do not reach the network grid, saying why and what to do (InputError); return
    warnings for smaller losses."""
    preset = grid.preset.name
    voxel, model_voxel = sizes_text(grid.source_voxel_mm), sizes_text(grid.preset.image.voxel_size_mm)
    shape, resampled = sizes_text(grid.source_shape), sizes_text(grid.resampled_shape)
    lost = fit.lost_to_voxel_size
    if len(lost) == len(fit.mask_voxels):
        volume = sum(fit.mask_voxels.values()) * fit.voxel_mm3
        raise InputError(
            f"{where}: no label reaches the model's grid: at the {model_voxel} mm voxels of preset '{preset}' the mask "
            f"({shape} voxels of {voxel} mm) becomes {resampled} voxels, and its labels {lost} ({volume:.3g} mm³ in "
            f"all) fill less than one; the voxel size in the header is likely wrong: write the real voxel size in mm "
            f"(pixdim, sform/qform), e.g. copy the header of the image the mask was drawn on"
        )
    field = sizes_text(np.multiply(grid.preset.image.mask_shape, grid.preset.image.voxel_size_mm))
    outside = fit.outside_field_of_view()
    per_label = ", ".join(f"label {label} {fraction:.1%}" for label, fraction in outside.items())
    where_field = f"the model's field of view ({field} mm, centred on the middle of the mask's array)"
    if max(outside.values()) > FIELD_OF_VIEW_LOSS_LIMIT:
        raise InputError(
            f"{where}: {where_field} leaves out too much of the labels ({per_label}; at most "
            f"{FIELD_OF_VIEW_LOSS_LIMIT:.0%} of any label is accepted): the mask spans {resampled} voxels of "
            f"{model_voxel} mm; crop it to at most {field} mm centred on the labels, or, if its voxel size "
            f"({voxel} mm) is wrong, correct the header"
        )
    warnings = []
    if fit.labelled_outside_field_of_view() > 0:
        warnings.append(
            f"{where}: {fit.labelled_outside_field_of_view():.1%} of the labelled voxels lie outside "
            f"{where_field} and are cropped away ({per_label}); the image there is background"
        )
    if lost:
        warnings.append(
            f"{where}: labels {lost} vanish at the model's voxel size ({model_voxel} mm), too small or "
            f"thin for its voxels: the image has no such structure"
        )
    return warnings


def check_affine(where: Path | str, affine: np.ndarray) -> None:
    """Refuse a voxel-to-mm affine with NaN or infinite values, a zero voxel size or collapsed axes (InputError)."""
    fix = (
        "write the real geometry into the header (sform/qform, pixdim in mm), e.g. copy the header of the image "
        "the mask was drawn on"
    )
    if not np.all(np.isfinite(affine)):
        raise InputError(
            f"{where}: the header's voxel-to-mm transform holds NaN or infinite values, so the mask has "
            f"no position or voxel size; {fix}"
        )
    sizes = voxel_sizes(affine)
    if abs(np.linalg.det(affine[:3, :3])) <= SINGULAR_RTOL * np.prod(sizes):
        raise InputError(
            f"{where}: the header's voxel-to-mm transform is singular (voxel sizes "
            f"{sizes_text(sizes)} mm: a zero voxel size, or axes that coincide); {fix}"
        )


def label_counts(labels: np.ndarray) -> dict[int, int]:
    """Voxels of each non-zero label present."""
    counts = np.bincount(labels.reshape(-1), minlength=1)
    return {int(label): int(counts[label]) for label in np.flatnonzero(counts) if label != 0}


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
    return 2.0 * one_hot - 1.0 if preset.condition.scale == ConditionScale.SYMMETRIC else one_hot


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
