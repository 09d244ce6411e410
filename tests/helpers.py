"""What many tests need: running the app, writing a mask, the fast sampling settings, reading its output."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np

from tests.conftest import REPO

PATIENT = "Doe^Jane 1970-01-01"  # written into test masks' headers: it must never reach an output or a log
FAST = ("--scheduler", "ddim", "--steps", "2", "--seed", "1")  # a run whose sampling is not the point
SAMPLING = re.compile(r"step \d+/\d+")  # a progress line: sampling started


def run_app(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    """`python -m app ARGS` in the repository, its output captured."""
    environment = {**os.environ, "HOLOSCAN_LOG_LEVEL": "WARN", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "app", *map(str, args)],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=kwargs.pop("timeout", 1200),
        **kwargs,
    )


def run_on_tmpfs(size: str, folder, command, list_folder_after: bool = False) -> subprocess.CompletedProcess:
    """`command` with a tmpfs of `size` (e.g. 48k) mounted on `folder`, in a private mount namespace (no root
    needed); with `list_folder_after`, `ls -A` of the folder is printed last, while it is still mounted."""
    listing = 'ls -A "$folder";' if list_folder_after else ""
    script = (
        f'folder="$1"; mount -t tmpfs -o size={size} tmpfs "$folder" && shift && "$@"; code=$?; {listing} exit $code'
    )
    return subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(folder), *map(str, command)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def write_mask(path, mask, affine, descrip=PATIENT):
    image = nib.Nifti1Image(mask, affine)
    image.header["descrip"] = descrip.encode()
    nib.save(image, path)
    return path


def imported_modules(stderr: str) -> set[str]:
    """Module names from `python -X importtime` output."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def cosine_betas(timesteps: int = 250, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule, written out independently of diffusers."""

    def alpha_bar(t):
        return math.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar(i + 1) / alpha_bar(i), 0.999) for i in range(timesteps)])
