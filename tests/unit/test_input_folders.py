"""Finding the masks of an input: every mask gets an output folder of its own, or a refusal that says why."""

from __future__ import annotations

import logging
import os

import nibabel as nib
import numpy as np
import pytest

from meddpm.errors import InputError
from meddpm.input_folders import find_mask_inputs
from meddpm.names import NAME_BYTES
from tests.dicom_samples import label_map_series


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


@pytest.mark.parametrize(
    "series_number",
    [b"1/../../ESCAPED", b"2\n[INFO] FORGED: wrote /etc ", b"..", b"\\x", b"7" * 40, b"3\0", b"-4"],
)
@pytest.mark.filterwarnings("ignore::UserWarning:pydicom")  # pydicom warns of the invalid Series Numbers we made
def test_a_dicom_attribute_never_names_a_folder_outside_its_own(tmp_path, series_number):
    label_map_series(tmp_path / "in", series_number, 0)
    [mask] = find_mask_inputs(tmp_path / "in")
    assert mask.problem is None and mask.name.startswith("labelmap_")
    assert (tmp_path / "out" / mask.name).parent == tmp_path / "out" and mask.name.isprintable()
    assert "ESCAPED" not in mask.name and "FORGED" not in mask.name


def test_a_well_formed_series_number_still_names_the_folder(tmp_path):
    label_map_series(tmp_path / "in", b"12", 0)
    assert find_mask_inputs(tmp_path / "in")[0].name.startswith("labelmap_12_")


def test_the_same_dicom_mask_in_two_folders_gets_two_names(tmp_path, phantom):
    """One SEG copied into two folders (one SOP Instance UID): the user cannot rename it, so the app does."""
    from tests.dicom_samples import save

    *_, seg = phantom
    save([seg], tmp_path / "in" / "a", "seg")
    save([seg], tmp_path / "in" / "b", "seg")
    inputs = find_mask_inputs(tmp_path / "in")
    assert [i.problem for i in inputs] == [None, None]
    assert len({i.name for i in inputs}) == 2 and all(i.name.startswith("seg_") for i in inputs)


def test_an_output_folder_inside_the_input_folder_is_refused(tmp_path):
    from meddpm.errors import ConfigurationError
    from meddpm.input_folders import keep_outputs_apart

    (tmp_path / "d").mkdir()
    nifti(tmp_path / "d" / "phantom_00.nii.gz")
    inputs = find_mask_inputs(tmp_path / "d")
    for output in (tmp_path / "d", tmp_path / "d" / "out"):
        with pytest.raises(ConfigurationError, match="lies inside the input folder"):
            keep_outputs_apart(tmp_path / "d", output, inputs)
    assert keep_outputs_apart(tmp_path / "d", tmp_path / "out", inputs) == inputs


def test_a_mask_whose_output_folder_holds_input_files_is_refused(tmp_path):
    """-i data/sub-01/sub-01.nii.gz -o data: the output folder data/sub-01 is the input's own folder."""
    from meddpm.input_folders import keep_outputs_apart

    (tmp_path / "data" / "sub-01").mkdir(parents=True)
    mask = nifti(tmp_path / "data" / "sub-01" / "sub-01.nii.gz")
    [refused] = keep_outputs_apart(mask, tmp_path / "data", find_mask_inputs(mask))
    assert refused.problem and "sub-01: holds input files (sub-01.nii.gz)" in refused.problem
    assert "outside the input" in refused.problem
