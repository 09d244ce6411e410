"""The application image, built from the repository's Dockerfile and run here (scripts/container_check.sh).

Deselected by default (marker `container`): it needs root for podman, installs Debian packages when missing and
takes about 15 minutes on 2 cores. Run it with
`.venv/bin/python -m pytest -m container tests/integration/test_container.py`.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.container, pytest.mark.timeout(3600)]


def test_image_builds_runs_and_writes_the_right_volume():
    if os.geteuid() != 0:
        pytest.skip("podman builds and runs here as root only (deploy/README.md)")
    result = subprocess.run(
        [str(REPO / "scripts" / "container_check.sh")], cwd=REPO, capture_output=True, text=True, timeout=3600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.count("\nOK ") == 2 and "equal to" in result.stdout, result.stdout[
        -4000:
    ]  # in process, Triton
    assert "user 10001:10001" in result.stdout
