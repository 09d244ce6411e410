"""What many tests need: running the app, writing a mask, the fast sampling settings, reading its output."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np

from tests.conftest import REPO

PATIENT = "Doe^Jane 1970-01-01"  # written into test masks' headers: it must never reach an output or a log
FAST = ("--scheduler", "ddim", "--steps", "2", "--seed", "1")  # a run whose sampling is not the point
SAMPLING = re.compile(r"step \d+/\d+")  # a progress line: sampling started


def app_command(*args, python_options=()) -> list[str]:
    """The command line of `python -m app ARGS` (run it in the repository: run_app and start_app do), e.g. for
    run_on_tmpfs or a PACS plugin's configuration; `python_options` go before `-m`, e.g. ("-X", "importtime")."""
    return [sys.executable, *map(str, python_options), "-m", "app", *map(str, args)]


def app_environment(env=None) -> dict[str, str]:
    """This process's environment with the SDK's log level at WARN and `env` added; a variable set to None in
    `env` is removed (e.g. {"TRITON_SERVER_NETLOC": None}: no Triton server, whatever the caller's shell says)."""
    environment = {**os.environ, "HOLOSCAN_LOG_LEVEL": "WARN", **(env or {})}
    return {name: value for name, value in environment.items() if value is not None}


def run_app(*args, env=None, python_options=(), timeout: float = 1200, **kwargs) -> subprocess.CompletedProcess:
    """`python -m app ARGS` in the repository, its output captured; `kwargs` go to subprocess.run."""
    return subprocess.run(
        app_command(*args, python_options=python_options),
        cwd=REPO,
        env=app_environment(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def start_app(*args, env=None, **kwargs) -> subprocess.Popen:
    """`python -m app ARGS` in the repository, started and not waited for (to signal it, or to run several at
    once); `kwargs` go to subprocess.Popen, e.g. stderr=subprocess.PIPE to read its progress."""
    return subprocess.Popen(app_command(*args), cwd=REPO, env=app_environment(env), text=True, **kwargs)


def concurrently(*calls):
    """Call each of `calls` (e.g. `lambda: run_app(...)`) in a thread of its own, all at once, and return their
    results in order (an exception is raised as the call raised it). For runs of the app that do not depend on each
    other: their start-ups, most of a short run, overlap."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]


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
