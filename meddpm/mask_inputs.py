"""The masks an input path holds, each named for an output folder of its own.

NIfTI masks are the file given, or the `*.nii` / `*.nii.gz` files of the folder given (not of its subfolders),
each named for its file (`subj.nii.gz` -> `subj`); DICOM masks are found in the folder and all its subfolders
and named without patient data (meddpm.dicom.reader, imported only when the input holds DICOM files). Only file
headers are read here; `read_mask_input` reads one mask whole.

A name must be usable, alone, as one folder inside the output folder. An input whose name is empty, `.` or `..`,
hidden, longer than NAME_BYTES or holds control characters, inputs that would share a folder (`subj.nii` and
`subj.nii.gz`), and files that cannot be read are kept as refused inputs: each fails alone when its turn comes,
saying how to fix it, and the other masks go on. What looks like a mask but is skipped (an upper-case suffix, a
broken link, not a regular file) and folders that cannot be searched are logged.
"""

from __future__ import annotations

import collections
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from meddpm.errors import InputError
from meddpm.imaging.formats import NIFTI_SUFFIXES, is_dicom, is_nifti
from meddpm.imaging.masks import LabelMask, MaskInput, MaskKind, mask_name, name_digest, read_mask
from meddpm.model.presets import Preset

if TYPE_CHECKING:
    from meddpm.dicom.options import SegmentMap

log = logging.getLogger(__name__)
NAME_BYTES = 200  # a folder name may have 255; the staging folder beside it adds up to 20 (meddpm.atomic)


def find_mask_inputs(path: Path) -> list[MaskInput]:
    """The masks of `path` (a NIfTI or DICOM file, or a folder), bad names and unreadable files refused one by one."""
    if path.is_dir():
        inputs = _folder_inputs(path)
        if not inputs:
            raise InputError(
                f"{path}: the folder holds no NIfTI masks (.nii/.nii.gz) and no DICOM SEG or label-map series"
            )
    elif path.is_file():
        inputs = [_file_input(path)]
    elif path.exists() or path.is_symlink():
        raise InputError(
            f"{path}: is neither a regular file nor a folder (a FIFO, a device or a broken link); pass "
            f"a NIfTI mask, a DICOM SEG, or a folder of them"
        )
    else:
        raise InputError(f"{path}: no such file or folder; pass a NIfTI mask, a DICOM SEG, or a folder of them")
    return _refuse_shared_names(inputs, path)


def read_mask_input(source: MaskInput, preset: Preset, segment_map: SegmentMap | None = None) -> LabelMask:
    """Read and validate one mask for `preset`; InputError saying what is wrong and what is accepted."""
    if source.problem:
        raise InputError(source.problem)
    if source.kind == MaskKind.NIFTI:
        return read_mask(source.files[0], preset)
    from meddpm.dicom.reader import read_dicom_mask

    return read_dicom_mask(source, preset, segment_map)


def printable(text: str) -> str:
    """`text` with control characters escaped, safe for one log line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _file_input(path: Path) -> MaskInput:
    if is_nifti(path):
        return _nifti_input(path)
    try:
        dicom = is_dicom(path)
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({error.strerror}); make it readable, or pass another file") from None
    if not dicom:
        raise InputError(f"{path}: neither NIfTI (.nii/.nii.gz) nor DICOM (no 'DICM' marker at byte 128)")
    from meddpm.dicom.reader import group_dicom

    return group_dicom([path])[0]


def _folder_inputs(folder: Path) -> list[MaskInput]:
    nifti, dicom, unreadable = [], [], []
    for root, subfolders, files in os.walk(folder, onerror=_log_unsearchable):
        subfolders.sort()
        for name in sorted(files):
            path = Path(root, name)
            if name.lower().endswith(NIFTI_SUFFIXES):
                if path.parent == folder and _usable_nifti(path):
                    nifti.append(_nifti_input(path))
                continue
            if not path.is_file():
                continue
            try:
                if is_dicom(path):
                    dicom.append(path)
            except OSError as error:
                unreadable.append(
                    MaskInput(
                        f"unreadable_{name_digest(str(path))}",
                        MaskKind.REFUSED,
                        (path,),
                        (
                            f"{printable(str(path))}: cannot be read ({error.strerror}); make it readable, "
                            f"or move it out of the input folder"
                        ),
                    )
                )
    if dicom:
        from meddpm.dicom.reader import group_dicom

        return [*nifti, *group_dicom(dicom), *unreadable]
    return [*nifti, *unreadable]


def _usable_nifti(path: Path) -> bool:
    """Whether a file named like a NIfTI mask is one to read; logs why not."""
    why = (
        "a broken symbolic link"
        if path.is_symlink() and not path.exists()
        else "not a regular file"
        if not path.is_file()
        else "an upper- or mixed-case suffix: rename it to .nii or .nii.gz"
        if not is_nifti(path)
        else None
    )
    if why:
        log.warning("%s: skipped, %s", printable(str(path)), why)
    return why is None


def _nifti_input(path: Path) -> MaskInput:
    name = mask_name(path)
    problem = _name_problem(name)
    if problem:
        return MaskInput(
            printable(path.name),
            MaskKind.REFUSED,
            (path,),
            (
                f"{printable(str(path))}: {problem}, which cannot name its output folder; rename the file (letters, "
                f"digits, '-', '_' and '.' are safe)"
            ),
        )
    return MaskInput(name, MaskKind.NIFTI, (path,))


def _name_problem(name: str) -> str | None:
    if not name:
        return "the name is empty before its suffix"
    if name in (".", ".."):
        return f"the name is '{name}'"
    if name.startswith("."):
        return "the name starts with '.' (hidden, and the app's own staging folders are named so)"
    if not name.isprintable():
        return "the name holds control characters"
    if len(os.fsencode(name)) > NAME_BYTES:
        return f"the name is longer than {NAME_BYTES} bytes"
    return None


def _refuse_shared_names(inputs: list[MaskInput], root: Path) -> list[MaskInput]:
    """Inputs that would write the same output folder are all refused: none may overwrite another."""
    counts = collections.Counter(i.name for i in inputs if i.kind != MaskKind.REFUSED)
    refused = []
    for source in inputs:
        if source.kind != MaskKind.REFUSED and counts[source.name] > 1:
            others = [printable(str(i.files[0])) for i in inputs if i.name == source.name and i is not source]
            label = printable(str(source.files[0].relative_to(root) if root.is_dir() else source.files[0].name))
            source = MaskInput(
                label,
                MaskKind.REFUSED,
                source.files,
                (
                    f"{printable(str(source.files[0]))}: shares its output folder name '{source.name}' with "
                    f"{', '.join(others)}; rename one of them so that each mask gets a folder of its own"
                ),
            )
        refused.append(source)
    return refused


def _log_unsearchable(error: OSError) -> None:
    log.warning("%s: folder cannot be searched for masks (%s); skipped", printable(str(error.filename)), error.strerror)
