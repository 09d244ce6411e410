"""Finding the masks of an input: every mask gets an output folder of its own, or a refusal that says why."""

from __future__ import annotations

import logging
import os

import nibabel as nib
import numpy as np
import pytest

from meddpm.errors import InputError
from meddpm.mask_inputs import NAME_BYTES, find_mask_inputs


def nifti(path):
    mask = np.zeros((4, 4, 4), np.uint8)
    mask[1:3, 1:3, 1:3] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), path)
    return path


def unreadable(path):
    """A file no one can read, root included: reading /proc/self/mem at offset 0 fails with EIO."""
    path.symlink_to("/proc/self/mem")
    return path


def by_name(inputs):
    return {i.name: i for i in inputs}


def test_names_that_cannot_name_a_folder_of_their_own_are_refused(tmp_path):
    for name in (
        ".nii.gz",
        ".nii",
        "..nii.gz",
        "...nii",
        ".hidden.nii.gz",
        "forged\nINFO ok.nii.gz",
        "x" * (NAME_BYTES + 1) + ".nii",
        "fine.nii.gz",
    ):
        nifti(tmp_path / name)
    inputs = by_name(find_mask_inputs(tmp_path))
    assert inputs["fine"].kind == "nifti" and inputs["fine"].problem is None
    refused = [i for i in inputs.values() if i.kind == "refused"]
    assert len(refused) == len(inputs) - 1 == 7
    for source in refused:
        assert "rename the file" in source.problem and "\n" not in source.problem and "\n" not in source.name
    assert "empty" in inputs[".nii.gz"].problem and "'.'" in inputs["..nii.gz"].problem
    assert "'..'" in inputs["...nii"].problem and "control characters" in inputs["forged\\nINFO ok.nii.gz"].problem


def test_masks_that_would_share_an_output_folder_are_all_refused(tmp_path):
    nifti(tmp_path / "subj.nii")
    nifti(tmp_path / "subj.nii.gz")
    nifti(tmp_path / "other.nii.gz")
    inputs = by_name(find_mask_inputs(tmp_path))
    assert sorted(inputs) == ["other", "subj.nii", "subj.nii.gz"]  # two refusals, each under its own label
    assert "shares its output folder name 'subj' with" in inputs["subj.nii"].problem
    assert str(tmp_path / "subj.nii.gz") in inputs["subj.nii"].problem


def test_an_unreadable_stray_file_fails_alone_and_skipped_entries_are_logged(tmp_path, caplog):
    nifti(tmp_path / "head.nii.gz")
    unreadable(tmp_path / "stray.bin")
    nifti(tmp_path / "UPPER.NII.GZ")
    (tmp_path / "dangling.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    os.mkfifo(tmp_path / "pipe.nii")
    with caplog.at_level(logging.WARNING):
        inputs = find_mask_inputs(tmp_path)
    assert [i.kind for i in inputs] == ["nifti", "refused"]
    assert "stray.bin: cannot be read (Input/output error)" in inputs[1].problem
    logged = caplog.text
    assert "UPPER.NII.GZ: skipped, an upper- or mixed-case suffix" in logged
    assert "dangling.nii.gz: skipped, a broken symbolic link" in logged
    assert "pipe.nii: skipped, not a regular file" in logged


@pytest.mark.parametrize("kind", ["fifo", "device", "unreadable file"])
def test_an_input_path_that_is_no_file_or_folder_to_read_is_refused(tmp_path, kind):
    path = tmp_path / "input"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path = tmp_path / "null"
        path.symlink_to("/dev/null")
    else:
        unreadable(path)
    with pytest.raises(InputError, match="neither a regular file nor a folder|cannot be read"):
        find_mask_inputs(path)
