"""The app and its network peers: a setting no PACS or Triton server could work with ends the run before any
sampling (exit 2, no traceback), and SIGTERM ends a PACS retry pause at once (exit 130) with the output kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from harness import free_port
from tests.helpers import FAST, start_app

pytestmark = pytest.mark.slow
DICOM = ("--output-format", "dicom")
PACS = (*DICOM, "--pacs-cstore", "ORTHANC@127.0.0.1:4242")
OUTPUT = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}  # one stream, read as the app writes it


def test_bad_network_settings_are_refused_before_any_sampling(demo_repository, head_file, tmp_path):
    (tmp_path / "latin-1").write_bytes("réader:pässword\n".encode("latin-1"))
    os.mkfifo(tmp_path / "fifo")
    stow = (*DICOM, "--pacs-stow-url", "http://127.0.0.1:1/dicom-web")
    cases = {  # name: (arguments, environment, what the message says)
        "newline": ((*PACS, "--pacs-calling-ae", "ME\nDDPM"), {}, r"'ME\nDDPM' is not an AE title"),
        "long": ((*PACS, "--pacs-calling-ae", "A" * 17), {}, "is not an AE title"),
        "called": ((*DICOM, "--pacs-cstore", "ORTHANC\t@127.0.0.1:4242"), {}, "is not an AE title"),
        "port": ((*DICOM, "--pacs-cstore", "X@127.0.0.1:99999"), {}, "with a port from 1 to 65535"),
        "url": ((*DICOM, "--pacs-stow-url", "http://[::1/dicom-web"), {}, "not a URL (Invalid IPv6 URL)"),
        "window": (("--triton-retry-window", "inf"), {}, "inf is not a number of seconds"),
        "netloc": (("--triton-retry-window", "5"), {"TRITON_SERVER_NETLOC": "not a netloc"}, "is not HOST:PORT"),
        "latin-1": (stow, {"MEDDPM_DICOMWEB_CREDENTIALS_FILE": str(tmp_path / "latin-1")}, "not UTF-8 text"),
        "fifo": (stow, {"MEDDPM_DICOMWEB_CREDENTIALS_FILE": str(tmp_path / "fifo")}, "not a regular file"),
    }
    runs = {
        name: start_app(
            "-i", head_file, "-o", tmp_path / "out" / name, "-m", demo_repository, *FAST, *args, env=env, **OUTPUT
        )
        for name, (args, env, _) in cases.items()
    }
    try:
        outputs = {name: app.communicate(timeout=300)[0] for name, app in runs.items()}
    finally:
        for app in runs.values():
            app.kill()
    for name, (_, _, message) in cases.items():
        output = outputs[name]
        assert runs[name].returncode == 2, f"{name}: {output}"
        assert message in output and "Traceback" not in output, f"{name}: {output}"
        assert not any(line.startswith("DDPM") for line in output.splitlines()), output
        assert not (tmp_path / "out" / name / "head").exists(), name


def test_sigterm_ends_a_pacs_retry_pause_at_once_and_keeps_the_output(demo_repository, head_file, tmp_path):
    out = tmp_path / "out"
    closed = f"ORTHANC@127.0.0.1:{free_port()}"
    app = start_app(
        "-i",
        head_file,
        "-o",
        out,
        "-m",
        demo_repository,
        *FAST,
        *DICOM,
        "--pacs-cstore",
        closed,
        "--pacs-retries",
        "40",
        **OUTPUT,
    )
    try:
        seen = []
        for line in app.stdout:  # the pauses are 1, 2, 4 ... s: the third is long enough to land in
            seen.append(line)
            if "retrying in 4 s" in line:
                break
        app.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        output = "".join(seen) + app.communicate(timeout=60)[0]
        stopped_after = time.monotonic() - signalled
    finally:
        app.kill()
    assert app.returncode == 130 and stopped_after < 30, output
    assert "stopped by Ctrl-C or SIGTERM while waiting to retry C-STORE" in output and "Traceback" not in output
    assert "stopped by Ctrl-C or SIGTERM" in json.loads((out / "head" / "pacs.json").read_text())["error"]
    assert len(list((out / "head" / "dicom").rglob("*.dcm"))) == 32
