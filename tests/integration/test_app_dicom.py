"""The app on a folder of DICOM masks: SEG, a label-map series and a NIfTI beside them, bad ones reported."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pydicom

from harness.dciodvfy import dciodvfy_errors
from meddpm.dicom.phantom_study import segmentation
from tests.dicom_samples import leaked_values, save
from tests.helpers import run_app


def test_app_synthesises_dicom_masks_and_reports_bad_ones(demo_repository, phantom, tmp_path):
    """SEGs and a NIfTI mask in one folder; a SEG with foreign segments and a corrupt file fail alone; the source
    MR series is ignored because SEGs are present; no patient attribute reaches an output or the logs."""
    labels, affine, _, mr, seg = phantom
    inputs = tmp_path / "in"
    save(mr, inputs / "mr", "mr")
    save([seg], inputs / "seg", "seg")
    three = np.where(labels == 0, 3, labels).astype(np.uint8)
    save([segmentation(mr, three, {1: "Skull", 2: "Vessel", 3: "Eye"})], inputs / "foreign", "seg")
    (inputs / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(200))
    nib.save(nib.Nifti1Image(labels, affine), inputs / "plain.nii.gz")
    out = tmp_path / "out"
    result = run_app(
        "-i",
        inputs,
        "-o",
        out,
        "-m",
        demo_repository,
        "-l",
        "DEBUG",
        "--scheduler",
        "ddim",
        "--steps",
        "3",
        "--seed",
        "9",
        "--output-format",
        "dicom",
        timeout=600,
    )
    logs = result.stdout + result.stderr
    assert result.returncode == 1, logs
    assert "2 mask(s) synthesised, 2 failed" in result.stdout, logs
    assert "segments [3] match no label" in result.stdout and "corrupt.dcm: cannot be read as DICOM" in result.stdout
    folders = sorted(p.name for p in out.iterdir())
    assert len(folders) == 2 and "plain" in folders and folders[1].startswith("seg_50_"), folders
    for folder in folders:
        assert sorted(p.name for p in (out / folder).iterdir()) == [
            ".meddpm-output.json",
            "dicom",
            "preview.png",
            "record.json",
        ]
        files = sorted((out / folder / "dicom" / "sample_0_T1").iterdir())
        assert len(files) == 32
        for path in files:
            assert dciodvfy_errors(path) == [], path
        has_reference = "SourceImageSequence" in pydicom.dcmread(files[0])
        assert has_reference == (folder != "plain")  # a NIfTI mask has no DICOM object to refer to
    assert leaked_values(logs) == []
    for path in out.rglob("*"):
        if path.is_file():
            assert leaked_values(path) == [], path
