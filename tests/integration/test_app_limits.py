"""The app refuses, before sampling, a run that the limits it runs under cannot hold: its address space
(`ulimit -v`), its output disk."""

from __future__ import annotations

import re
import resource

import nibabel as nib

from benchmarks.mask_memory import head_mask
from tests.helpers import FAST, SAMPLING, app_command, run_app, run_on_tmpfs


def test_a_mask_beyond_the_address_space_limit_is_refused_before_sampling(demo_repository, tmp_path):
    """512^3 voxels, 4 samples, under `ulimit -v` 4.5 GB: it used to pass the check (free memory only) and die
    with a MemoryError after sampling."""
    nib.save(nib.Nifti1Image(*head_mask(512, 0.375)), tmp_path / "big.nii.gz")
    result = run_app(
        "-i",
        tmp_path / "big.nii.gz",
        "-o",
        tmp_path / "out",
        "-m",
        demo_repository,
        *FAST,
        "--samples",
        "4",
        "--backend",
        "onnxruntime",
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (4_500_000_000, 4_500_000_000)),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert re.search(
        r"FAILED big: .*big.nii.gz: 4 sample\(s\) of this mask need about \d+\.\d GiB in this process .* but the "
        r"address-space limit \(ulimit -v\) allows it \d+\.\d GiB; ",
        result.stdout,
    ), output
    assert "raise or lift `ulimit -v`" in result.stdout
    assert not SAMPLING.search(output) and "MemoryError" not in output and "internal error" not in output


def test_an_output_disk_that_cannot_hold_any_mask_is_refused_at_once(demo_repository, head_file, tmp_path):
    """An 8 KiB tmpfs (a private mount namespace): refused before the model is loaded, exit 2."""
    out = tmp_path / "out"
    out.mkdir()
    result = run_on_tmpfs("8k", out, app_command("-i", head_file, "-o", out, "-m", demo_repository, *FAST))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert f"{out}: its file system has 8 KiB free, less than any mask's outputs need (at least 16 KiB)" in output
    assert "free space, or choose another output folder (-o, HOLOSCAN_OUTPUT_PATH)" in output
    assert not SAMPLING.search(output) and "Traceback" not in output
