"""Reading a NIfTI label mask and checking that a preset can use it."""

from __future__ import annotations

import dataclasses
import hashlib
from enum import StrEnum
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from meddpm.errors import InputError
from meddpm.imaging.formats import is_nifti
from meddpm.imaging.geometry import check_affine
from meddpm.model.presets import Preset

MAX_SIDE = 1024  # voxels per axis
MAX_VOXELS = 512**3  # refused before any voxel is read


class MaskKind(StrEnum):
    NIFTI = "nifti"
    SEG = "seg"  # a DICOM SEG instance
    LABEL_MAP = "label-map"  # a DICOM image series whose pixel values are the labels
    REFUSED = "refused"  # refused before reading: `problem` says why


@dataclasses.dataclass(frozen=True)
class MaskInput:
    """One mask of the input, not yet read: a NIfTI file, a DICOM SEG, the slices of a label-map series, or an
    input refused before reading (meddpm.mask_inputs)."""

    name: str  # its output folder's name; for a refused input, a printable label for the run's summary
    kind: MaskKind
    files: tuple[Path, ...]
    problem: str | None = None  # why it is refused: the message it fails with


@dataclasses.dataclass
class LabelMask:
    name: str  # file name without suffix: names the output folder
    labels: np.ndarray  # (X, Y, Z) uint8
    affine: np.ndarray  # 4x4, voxel -> scanner mm
    source: str  # the file or series it was read from, for messages


def mask_name(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii")


def name_digest(text: str) -> str:
    """A short digest that names an output folder without the text it comes from (UIDs, paths)."""
    return hashlib.sha256(text.encode(errors="surrogateescape")).hexdigest()[:8]


def read_mask(path: Path, preset: Preset) -> LabelMask:
    """Load and validate one label mask for `preset` (raises InputError naming the file)."""
    if not is_nifti(path):
        raise InputError(f"{path}: not a NIfTI file; masks must be .nii or .nii.gz label volumes")
    try:
        image: Any = nib.load(path)  # a Nifti1Image or Nifti2Image (nibabel's stubs say FileBasedImage)
        with image.file_map["image"].get_prepare_fileobj("rb") as stored:  # unchecked: nibabel makes 0 mm 1 mm
            stored_header = type(image.header).from_fileobj(stored, check=False)
    except Exception as error:  # nibabel raises many types for a damaged file
        raise InputError(f"{path}: cannot be read as NIfTI ({type(error).__name__}: {error})") from None
    shape = tuple(int(s) for s in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{path}: has {len(shape)} dimensions {shape}; a label mask must be one 3-D volume (X, Y, Z)")
    if max(shape) > MAX_SIDE or int(np.prod(shape)) > MAX_VOXELS:
        raise InputError(
            f"{path}: size {shape} is beyond what is accepted (at most {MAX_SIDE} voxels a side and "
            f"{MAX_VOXELS} in all); crop or downsample the mask"
        )
    pixdim = stored_header["pixdim"][1:4]
    if stored_header.get_sform(coded=True)[1] == 0 and not np.all(np.isfinite(pixdim) & (pixdim != 0)):
        raise InputError(
            f"{path}: the header's voxel size (pixdim) is {pixdim.tolist()} mm and no sform gives one; "
            f"write the real voxel size in mm into pixdim, e.g. copy the header of the image the mask "
            f"was drawn on"
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    check_affine(path, affine)
    try:
        data = np.asanyarray(image.dataobj).reshape(shape)
    except Exception as error:
        raise InputError(f"{path}: voxel data cannot be read ({type(error).__name__}: {error})") from None
    labels = integer_labels(path, data)
    check_label_values(path, labels, preset)
    return LabelMask(mask_name(path), labels, affine, str(path))


def integer_labels(path: Path | str, data: np.ndarray) -> np.ndarray:
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(f"{path}: voxel type {data.dtype} is not numeric; a label mask holds integer labels")
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        bad = np.unique(data[~np.isfinite(data) | (data != np.round(data))])[:5]
        raise InputError(
            f"{path}: holds non-integer values (e.g. {', '.join(f'{v:g}' for v in bad)}); a label mask holds "
            f"integer labels only (is this an image rather than a mask?)"
        )
    if data.min() < 0 or data.max() > 255:
        raise InputError(f"{path}: label values range {data.min():g}..{data.max():g}; labels must be 0..255")
    return data.astype(np.uint8)


def check_label_values(path: Path | str, labels: np.ndarray, preset: Preset) -> None:
    present = set(np.unique(labels).tolist())
    accepted = {0, *preset.condition.labels}
    unknown = sorted(present - accepted)
    if unknown:
        raise InputError(
            f"{path}: label values {unknown} are not labels of preset '{preset.name}', which accepts "
            f"{sorted(accepted)} (0 is background); relabel the mask or choose another model"
        )
    if present <= {0}:
        raise InputError(
            f"{path}: the mask is empty (background only); it must mark labels {list(preset.condition.labels)}"
        )
