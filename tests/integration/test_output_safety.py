"""The app replaces only what it wrote, and writes only inside -o: user folders, inputs and names taken from DICOM
attributes, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from meddpm.output_folders import OWNER_MARK
from tests.dicom_samples import label_map_series
from tests.helpers import FAST, run_app, write_mask

pytestmark = pytest.mark.slow
AFFINE = np.diag([6.0, 6.0, 6.0, 1.0])


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_only_folders_the_app_wrote_are_replaced(demo_repository, head, tmp_path):
    masks, out = tmp_path / "in", tmp_path / "out"
    masks.mkdir()
    for name in ("phantom_00", "phantom_01", "phantom_02"):
        write_mask(masks / f"{name}.nii.gz", head, AFFINE)
    (out / "phantom_00").mkdir(parents=True)
    (out / "phantom_00" / "raw_T1.txt").write_text("the user's own")
    (out / ".thesis.partial-backup").mkdir()
    (out / ".thesis.partial-backup" / "chapter1.tex").write_text("precious")
    users = tree(out)

    first = run_app("-i", masks, "-o", out, "-m", demo_repository, *FAST)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "2 mask(s) synthesised, 1 failed" in first.stdout
    assert "FAILED phantom_00: " in first.stdout and "holds files this app did not write there (raw_T1.txt)" in (
        first.stdout
    )
    assert (out / "phantom_01" / OWNER_MARK).is_file() and (out / "phantom_02" / "record.json").is_file()

    (out / "phantom_02" / "notes.txt").write_text("added by the user")
    written = json.loads((out / "phantom_01" / "record.json").read_text())["created"]
    second = run_app("-i", masks, "-o", out, "-m", demo_repository, *FAST[:-1], "2")
    assert second.returncode == 1, second.stdout + second.stderr
    assert "1 mask(s) synthesised, 2 failed" in second.stdout and "(notes.txt)" in second.stdout
    assert json.loads((out / "phantom_01" / "record.json").read_text())["seeds"] == [2], written  # replaced
    assert (out / "phantom_02" / "notes.txt").read_text() == "added by the user"
    assert {k: v for k, v in tree(out).items() if k in users} == users  # the user's files, byte for byte
    assert sorted(p.name for p in out.iterdir()) == [".thesis.partial-backup", "phantom_00", "phantom_01", "phantom_02"]


def test_inputs_and_outputs_that_meet_are_refused_before_any_work(demo_repository, head, tmp_path):
    subject = tmp_path / "data" / "sub-01"
    subject.mkdir(parents=True)
    write_mask(subject / "sub-01.nii.gz", head, AFFINE)
    (subject / "notes.txt").write_text("the user's own")
    before = tree(tmp_path)

    bids = run_app("-i", subject / "sub-01.nii.gz", "-o", tmp_path / "data", "-m", demo_repository, *FAST)
    assert bids.returncode == 1 and "0 mask(s) synthesised, 1 failed" in bids.stdout, bids.stdout + bids.stderr
    assert "sub-01: holds input files (sub-01.nii.gz)" in bids.stdout and "step 1/" not in bids.stderr
    for output in (subject, subject / "out"):
        result = run_app("-i", subject, "-o", output, "-m", demo_repository, *FAST)
        assert result.returncode == 2 and "lies inside the input folder" in result.stderr, result.stderr
    assert tree(tmp_path) == before


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom")  # pydicom warns of the invalid Series Numbers made
def test_dicom_attributes_name_no_folder_outside_the_output_and_forge_no_log_line(demo_repository, tmp_path):
    """Series Numbers `1/../../ESCAPED` and one holding a newline and a forged log line."""
    label_map_series(tmp_path / "in" / "a", b"1/../../ESCAPED", 0)
    label_map_series(tmp_path / "in" / "b", b"2\n[INFO] FORGED: wrote /etc", 1)
    (tmp_path / "in" / "c\n[INFO] FORGED: file name.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    out = tmp_path / "out"
    result = run_app("-i", tmp_path / "in", "-o", out, "-m", demo_repository, "-l", "DEBUG", *FAST)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "2 mask(s) synthesised, 1 failed" in result.stdout, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    assert all(p.name.startswith("labelmap__") for p in out.iterdir()), list(out.iterdir())
    assert not [line for line in output.splitlines() if "FORGED" in line.split(":")[0] or line.startswith("[INFO]")]
