"""The app under bad input and faults: nothing outside a mask's own folder is touched, what cannot work is refused
before any sampling with its exit code, and a full disk or a signal at start-up ends with a clear message."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from harness import free_port
from tests.helpers import FAST, app_command, run_app, run_on_tmpfs, start_app, write_mask

pytestmark = pytest.mark.slow


def contents(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_mask_never_touches_anything_outside_its_own_output_folder(demo_repository, head, tmp_path):
    masks, out, elsewhere = tmp_path / "in", tmp_path / "out", tmp_path / "elsewhere"
    for folder in (masks, out / "earlier", elsewhere):
        folder.mkdir(parents=True)
    (out / "earlier" / "sample_0.nii.gz").write_text("an earlier result")
    (out / "notes.txt").write_text("unrelated")
    (elsewhere / "keep").write_text("precious")
    (out / "linked").symlink_to(elsewhere)
    affine = np.diag([6.0, 6.0, 6.0, 1.0])
    for name in (".nii.gz", "subj.nii", "subj.nii.gz", "x\nFORGED log line.nii.gz", "linked.nii.gz", "ok.nii.gz"):
        write_mask(masks / name, head, affine)
    before = contents(out)

    result = run_app("-i", masks, "-o", out, "-m", demo_repository, *FAST)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "1 mask(s) synthesised, 5 failed" in result.stdout
    assert contents(out) == sorted(
        [*before, "ok", "ok/.meddpm-output.json", "ok/preview.png", "ok/record.json", "ok/sample_0.nii.gz"]
    )
    assert (out / "earlier" / "sample_0.nii.gz").read_text() == "an earlier result"
    assert (elsewhere / "keep").read_text() == "precious" and (out / "linked").is_symlink()
    assert "the name is empty before its suffix" in output and "shares its output folder name 'subj'" in output
    assert "linked: is a symbolic link" in output and "the name holds control characters" in output
    assert not any(line.startswith("FORGED") for line in output.splitlines())
    assert "mask linked:" not in output  # refused before its mask was read, let alone sampled


def test_a_full_disk_is_named_and_leaves_nothing_behind(demo_repository, head_file, tmp_path):
    """The output folder is a 48 KiB tmpfs (a private mount namespace): the mask's outputs do not fit, and it is
    refused before it is sampled (a write that fails all the same: tests/unit/test_output_folders.py)."""
    out = tmp_path / "out"
    out.mkdir()
    command = app_command("-i", head_file, "-o", out, "-m", demo_repository, *FAST)
    result = run_on_tmpfs("48k", out, command, list_folder_after=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(
        r"FAILED head: .*head.nii.gz: its outputs \(1 sample\(s\) of 32x32x32 voxels as nifti\) may take up to "
        r"1.\d MiB, but .*out's file system has 4\d KiB free; free space",
        result.stdout,
    ), result.stdout
    assert "internal error" not in result.stdout + result.stderr
    assert "step 1/2" not in result.stdout + result.stderr  # refused before sampling
    assert result.stdout.splitlines()[-1].startswith("  FAILED head")  # `ls -A` of the tmpfs printed nothing


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--seed", str(2**64)), 2, "is not a seed from 0 to 9223372036854775807"),
        (("--seed", str(2**63 - 1), "--samples", "2"), 2, "choose a seed from 0 to 9223372036854775806"),
        (("--rescale", "0,inf"), 2, "MIN and MAX must be finite numbers"),
        (("--rescale=-1e39,0",), 2, "MIN and MAX must be finite numbers"),
        (("--threads", "100000"), 2, "the cores this process may use"),
        (("-o", "{file}/out"), 2, "cannot write outputs there (Not a directory)"),
        (("-i", "{fifo}"), 3, "is neither a regular file nor a folder"),
    ],
)
def test_what_cannot_work_is_refused_before_any_sampling(demo_repository, head_file, tmp_path, args, code, message):
    (tmp_path / "file").write_text("a file, not a folder")
    os.mkfifo(tmp_path / "fifo")
    args = [str(arg).format(file=tmp_path / "file", fifo=tmp_path / "fifo") for arg in args]
    for flag, default in (("-i", head_file), ("-o", tmp_path / "out")):
        args += [] if flag in args else [flag, default]
    result = run_app(*args, "-m", demo_repository, "--scheduler", "ddim", "--steps", "2")
    assert result.returncode == code, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("moment", ["importing", "waiting for the server"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_exits_130_without_a_traceback(demo_repository, head_file, tmp_path, sig, moment):
    """Start-up is stopped while the libraries are imported, and in its wait for a Triton server that is not there."""
    app = start_app(
        "-i",
        head_file,
        "-o",
        tmp_path / "out",
        "-m",
        demo_repository,
        "--triton-retry-window",
        "600",
        env={"TRITON_SERVER_NETLOC": f"localhost:{free_port()}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    seen = []
    if moment == "importing":
        time.sleep(0.5)
    else:
        for line in app.stderr:
            seen.append(line)
            if "waiting up to 600 s" in line:
                break
    app.send_signal(sig)
    stdout, stderr = app.communicate(timeout=120)
    stderr = "".join(seen) + stderr
    assert app.returncode == 130, stdout + stderr
    assert "stopped by Ctrl-C or SIGTERM while starting" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
