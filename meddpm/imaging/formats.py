"""File formats: how masks are recognised (by suffix, by the DICOM marker) and the formats volumes are written in."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_MARKER_OFFSET, DICOM_MARKER = 128, b"DICM"


class OutputFormat(StrEnum):
    NIFTI = "nifti"  # one volume per sample and channel
    DICOM = "dicom"  # one MR image series per sample and channel (meddpm.dicom.writer)


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def is_dicom(path: Path) -> bool:
    """Whether the file has the DICOM marker (raises OSError when it cannot be read)."""
    with path.open("rb") as file:
        return file.read(DICOM_MARKER_OFFSET + len(DICOM_MARKER))[DICOM_MARKER_OFFSET:] == DICOM_MARKER
