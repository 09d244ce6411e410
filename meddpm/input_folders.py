"""The masks an input path holds, each named for an output folder of its own.

NIfTI masks are the file given, or the `*.nii` / `*.nii.gz` files of the folder given (not of its subfolders),
each named for its file (`subj.nii.gz` -> `subj`); DICOM masks are found in the folder and its subfolders down
to MAX_DEPTH levels (deeper ones are logged and skipped) and named without patient data (meddpm.dicom.reader,
imported only when the input holds DICOM files). Only file headers are read here; `read_mask_input` reads one mask
whole.

A name must be usable, alone, as one folder inside the output folder: every name, NIfTI or DICOM, goes through
meddpm.names. An input whose name cannot (empty, `.` or `..`, hidden, a separator, control characters, too long),
NIfTI masks that would share a folder (`subj.nii` and `subj.nii.gz`), and files that cannot be read are kept as
refused inputs: each fails alone when its turn comes, saying how to fix it, and the other masks go on. DICOM masks
that would share a name (one SEG copied into two folders) get distinct names. What looks like a mask but is
skipped (an upper-case suffix, a broken link, not a regular file) and folders that cannot be searched are logged.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from meddpm.errors import ConfigurationError, InputError
from meddpm.imaging.formats import NIFTI_SUFFIXES, is_dicom, is_nifti
from meddpm.imaging.masks import LabelMask, MaskInput, MaskKind, mask_name, read_mask
from meddpm.model.presets import Preset
from meddpm.names import name_digest, name_problem, printable

if TYPE_CHECKING:
    from meddpm.dicom.options import SegmentMap

log = logging.getLogger(__name__)
MAX_DEPTH = 64  # folder levels searched below an input folder


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
    return _distinct_names([_refuse_unsafe_name(source) for source in inputs], path)


def keep_outputs_apart(path: Path, output_folder: Path, inputs: list[MaskInput]) -> list[MaskInput]:
    """Refuse an output folder inside the input folder (ConfigurationError): a second run would read the first's
    DICOM series as masks. Refuse each mask whose output folder would hold input files: it would replace them."""
    source, output = path.resolve(), output_folder.resolve()
    if path.is_dir() and output.is_relative_to(source):
        raise ConfigurationError(
            f"the output folder {output_folder} lies inside the input folder {path}: a run would replace input "
            f"files, and the next run would read this run's DICOM series as masks; choose an output folder "
            f"(-o, HOLOSCAN_OUTPUT_PATH) outside the input"
        )
    targets = {output / mask.name for mask in inputs}
    inside = collections.defaultdict(list)  # output folder -> the input files it holds
    for file in {file.resolve() for mask in inputs for file in mask.files}:
        for folder in file.parents:
            if folder in targets:
                inside[folder].append(printable(file.name))
    kept = []
    for mask in inputs:
        held = sorted(inside[output / mask.name])
        if mask.kind != MaskKind.REFUSED and held:
            mask = MaskInput(
                mask.name,
                MaskKind.REFUSED,
                mask.files,
                (
                    f"{printable(str(output_folder / mask.name))}: holds input files ({', '.join(held[:3])}), and "
                    f"this mask's output would replace that folder whole; choose an output folder (-o, "
                    f"HOLOSCAN_OUTPUT_PATH) outside the input"
                ),
            )
        kept.append(mask)
    return kept


def read_mask_input(source: MaskInput, preset: Preset, segment_map: SegmentMap | None = None) -> LabelMask:
    """Read and validate one mask for `preset`; InputError saying what is wrong and what is accepted."""
    if source.problem:
        raise InputError(source.problem)
    if source.kind == MaskKind.NIFTI:
        return read_mask(source.files[0], preset)
    from meddpm.dicom.reader import read_dicom_mask

    return read_dicom_mask(source, preset, segment_map)


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
    for root, files in _walk(folder):
        for name in files:
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


def _walk(folder: Path) -> Iterator[tuple[Path, list[str]]]:
    """(folder, its file names) for `folder` and its subfolders down to MAX_DEPTH levels, in name order, as os.walk
    gives them (links to folders are not followed) but without recursion: deeper folders are logged and skipped."""
    stack = [(folder, 0)]
    while stack:
        current, depth = stack.pop()
        try:
            with os.scandir(current) as scan:
                entries = [(entry, entry.is_dir()) for entry in sorted(scan, key=lambda entry: entry.name)]
        except OSError as error:
            _log_unsearchable(error)
            continue
        yield current, [entry.name for entry, is_folder in entries if not is_folder]
        subfolders = [entry for entry, is_folder in entries if is_folder and not entry.is_symlink()]
        if subfolders and depth == MAX_DEPTH:
            log.warning(
                "%s: its subfolders lie more than %d levels below the input folder and are not searched for "
                "masks; move the masks nearer to the input folder",
                printable(str(current)),
                MAX_DEPTH,
            )
            continue
        stack += [(Path(entry.path), depth + 1) for entry in reversed(subfolders)]


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
    return MaskInput(mask_name(path), MaskKind.NIFTI, (path,))


def _refuse_unsafe_name(source: MaskInput) -> MaskInput:
    """The one check of every name taken from input data, NIfTI or DICOM, before it names an output folder."""
    problem = None if source.kind == MaskKind.REFUSED else name_problem(source.name)
    if problem is None:
        return source
    return MaskInput(
        printable(source.files[0].name),
        MaskKind.REFUSED,
        source.files,
        (
            f"{printable(str(source.files[0]))}: {problem}, which cannot name its output folder; rename the file "
            f"(letters, digits, '-', '_' and '.' are safe)"
        ),
    )


def _distinct_names(inputs: list[MaskInput], root: Path) -> list[MaskInput]:
    """One output folder per mask. NIfTI masks that would share one (`subj.nii`, `subj.nii.gz`) are all refused:
    none may overwrite another, and only the user can choose new names. A DICOM mask's name is the app's own: one
    that another mask already has (the same SEG copied into two folders) gets a digest of its path added."""
    counts = collections.Counter(i.name for i in inputs if i.kind != MaskKind.REFUSED)
    named = []
    for source in inputs:
        if source.kind in (MaskKind.SEG, MaskKind.LABEL_MAP) and counts[source.name] > 1:
            source = dataclasses.replace(source, name=f"{source.name}_{name_digest(str(source.files[0]))}")
        elif source.kind == MaskKind.NIFTI and counts[source.name] > 1:
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
        named.append(source)
    return named


def _log_unsearchable(error: OSError) -> None:
    log.warning("%s: folder cannot be searched for masks (%s); skipped", printable(str(error.filename)), error.strerror)
