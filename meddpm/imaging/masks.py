"""Reading a NIfTI label mask and checking that a preset can use it."""

from __future__ import annotations

import dataclasses
import io
from enum import StrEnum
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.openers import Opener

from meddpm.errors import InputError
from meddpm.imaging.formats import is_nifti
from meddpm.imaging.geometry import check_affine
from meddpm.model.presets import Preset

MAX_SIDE = 1024  # voxels per axis
MAX_VOXELS = 512**3  # refused before any voxel is read
MAX_HEADER_BYTES = 2**24  # NIfTI header and extensions before the voxels
SLAB_VOXELS = 2**22  # NIfTI voxels read at a time: 32 MiB of float64


class MaskKind(StrEnum):
    NIFTI = "nifti"
    SEG = "seg"  # a DICOM SEG instance
    LABEL_MAP = "label-map"  # a DICOM image series whose pixel values are the labels
    REFUSED = "refused"  # refused before reading: `problem` says why


@dataclasses.dataclass(frozen=True)
class MaskInput:
    """One mask of the input, not yet read: a NIfTI file, a DICOM SEG, the slices of a label-map series, or an
    input refused before reading (meddpm.input_folders)."""

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


def read_mask(path: Path, preset: Preset) -> LabelMask:
    """Load and validate one label mask for `preset` (raises InputError naming the file).

    Shape, voxel type and header size are checked from the stored header before anything else is read; the
    voxels are then read a slab at a time into uint8 labels, so that no float or wide copy of the volume is made.
    """
    if not is_nifti(path):
        raise InputError(f"{path}: not a NIfTI file; masks must be .nii or .nii.gz label volumes")
    try:
        header = _stored_header(path)
        shape, datatype = tuple(int(s) for s in header.get_data_shape()), header.get_value_label("datatype")
        kind, offset = header.get_data_dtype().kind, header.get_data_offset()
    except Exception as error:  # nibabel raises many types for a damaged file
        raise InputError(f"{path}: cannot be read as NIfTI ({type(error).__name__}: {error})") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{path}: has {len(shape)} dimensions {shape}; a label mask must be one 3-D volume (X, Y, Z)")
    if min(shape) < 1 or max(shape) > MAX_SIDE or int(np.prod(shape)) > MAX_VOXELS:
        raise InputError(
            f"{path}: size {shape} is beyond what is accepted (1 to {MAX_SIDE} voxels a side and at most "
            f"{MAX_VOXELS} in all); crop or downsample the mask"
        )
    if kind not in "uif" or header.get_data_dtype().itemsize > 8:
        raise InputError(
            f"{path}: voxel type {datatype} is not accepted; a label mask holds integer labels, stored as an "
            f"integer type (uint8 is best) or a float type of at most 8 bytes: save it as uint8"
        )
    if offset > MAX_HEADER_BYTES:
        raise InputError(
            f"{path}: the header says its voxels start after {offset} bytes of header extensions; at most "
            f"{MAX_HEADER_BYTES} are accepted: save the mask without its header extensions"
        )
    try:
        image: Any = nib.load(path, mmap=False, keep_file_open=True)  # one open stream for all slabs
    except Exception as error:
        raise InputError(f"{path}: cannot be read as NIfTI ({type(error).__name__}: {error})") from None
    pixdim = header["pixdim"][1:4]  # as stored: nibabel's loaded header makes 0 mm 1 mm
    if header.get_sform(coded=True)[1] == 0 and not np.all(np.isfinite(pixdim) & (pixdim != 0)):
        raise InputError(
            f"{path}: the header's voxel size (pixdim) is {pixdim.tolist()} mm and no sform gives one; "
            f"write the real voxel size in mm into pixdim, e.g. copy the header of the image the mask "
            f"was drawn on"
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    check_affine(path, affine)
    labels = _read_labels(path, image.dataobj, shape)
    check_label_values(path, labels, preset)
    return LabelMask(mask_name(path), labels, affine, str(path))


def _stored_header(path: Path) -> Any:
    """The NIfTI-1 or -2 header as stored (nibabel's loaded one repairs some fields), without its extensions."""
    with Opener(str(path), "rb") as stored:
        block = stored.read(nib.Nifti2Header.sizeof_hdr)
    for header_class in (nib.Nifti1Header, nib.Nifti2Header):
        if header_class.may_contain_header(block):
            return header_class.from_fileobj(io.BytesIO(block[: header_class.sizeof_hdr]), check=False)
    raise ValueError("no NIfTI-1 or NIfTI-2 header")


def _read_labels(path: Path, stored: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The voxels of `stored` (nibabel's proxy) as uint8 labels, read and checked SLAB_VOXELS at a time."""
    labels = np.empty(shape, np.uint8)
    step = max(1, SLAB_VOXELS // (shape[0] * shape[1]))
    for start in range(0, shape[2], step):
        try:
            slab = np.asarray(stored[:, :, start : start + step]).reshape(shape[0], shape[1], -1)
        except Exception as error:
            raise InputError(f"{path}: voxel data cannot be read ({type(error).__name__}: {error})") from None
        labels[:, :, start : start + step] = integer_labels(path, slab)
    return labels


def integer_labels(path: Path | str, data: np.ndarray) -> np.ndarray:
    """`data` as uint8 labels; InputError unless it is of a real number type and holds integers 0..255 only."""
    if data.dtype.kind not in "uif":
        raise InputError(
            f"{path}: voxel type {data.dtype} is not a real number type; a label mask holds integer labels"
        )
    if data.dtype.kind == "f":
        odd = ~np.isfinite(data) | (data != np.round(data))
        if odd.any():
            bad = np.unique(data[odd])[:5]
            raise InputError(
                f"{path}: holds non-integer values (e.g. {', '.join(f'{v:g}' for v in bad)}); a label mask holds "
                f"integer labels only (is this an image rather than a mask?)"
            )
    if data.size and (data.min() < 0 or data.max() > 255):
        value = data.min() if data.min() < 0 else data.max()
        raise InputError(f"{path}: holds the label value {value:g}; labels must be 0..255")
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
