"""The PACS demo (scripts/pacs_demo.sh): Orthanc with the synthesis plugin and the Web Viewer on loopback ports;
a phantom MR study and its SEG stored through Orthanc's DICOM port, as a segmentation tool sends them; the synthetic
series that comes back, checked with dciodvfy and opened in the Web Viewer by headless Chromium.

    python -m harness.pacs_demo [--out build/pacs-demo] [--models REPOSITORY] [--keep-running]

Orthanc runs deploy/orthanc/orthanc.json, the site configuration, with this checkout's paths and free loopback
ports; its site file registers the demo's segmentation tool and a user with a password made for this run (printed,
to browse with --keep-running). Everything it starts is stopped at the end, unless --keep-running (then Ctrl-C
stops it).
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness import free_port
from harness.dciodvfy import dciodvfy_errors
from harness.local_orthanc import LocalOrthanc, site_configuration
from harness.viewer import screenshot_series
from meddpm.dicom.phantom_study import phantom_study

REPO = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = REPO / "models" / "demo" / "model_demo.pt"
CALLING_AE = "SEGTOOL"  # the segmentation tool that stores the SEG
USER = "demo"
METADATA = "MeddpmSynthesis"


def orthanc_config(models: Path, jobs: Path) -> dict:
    """deploy/orthanc/orthanc.json with this checkout's app and the demo's models."""
    synthesis = {
        "Command": [sys.executable, "-m", "app"],
        "WorkingDirectory": str(REPO),
        "ModelRepository": str(models),
        "Arguments": ["--seed", "1"],
        "JobsDirectory": str(jobs),
    }
    return site_configuration(synthesis, StableAge=2)


def site_file(password: str) -> dict:
    """The demo site's users and modalities: the segmentation tool that stores the SEG, and one user."""
    return {
        "RegisteredUsers": {USER: password},
        "DicomModalities": {"segtool": [CALLING_AE, "127.0.0.1", free_port()]},
    }


def wait_for_job(orthanc: LocalOrthanc, series: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metadata = orthanc.get(f"/series/{series}/metadata?expand")
        state = json.loads(metadata[METADATA]) if METADATA in metadata else {}
        if state.get("state") in ("done", "failed"):
            return state
        time.sleep(0.5)
    raise TimeoutError(f"no synthetic series within {timeout_s:g} s; Orthanc's log: {orthanc.log}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.pacs_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "pacs-demo")
    parser.add_argument("--models", type=Path, help="model repository (default: the demo model, exported into OUT)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the synthetic series")
    parser.add_argument("--keep-running", action="store_true", help="leave Orthanc up to browse it; Ctrl-C stops it")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    models = args.models
    if models is None:
        models = out / "models"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "export",
                "--checkpoint",
                DEMO_CHECKPOINT,
                "--preset",
                "demo",
                "--repository",
                models,
            ],
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    config, password = orthanc_config(models.resolve(), out / "jobs"), secrets.token_urlsafe(12)
    with LocalOrthanc(out / "orthanc", config, site_file(password), credentials=(USER, password)) as orthanc:
        print(f"Orthanc {orthanc.url} (DICOM port {orthanc.dicom_port}, AE {orthanc.ae_title}); log {orthanc.log}")
        print(f"user {USER}, password {password} (made for this run)")
        mr, seg = phantom_study(seed=7)
        started = time.monotonic()
        orthanc.c_store([*mr, seg], CALLING_AE)
        source = orthanc.series_id(seg.SeriesInstanceUID)
        print(f"stored a phantom MR series ({len(mr)} instances) and its SEG (series {source}) by C-STORE")
        job = wait_for_job(orthanc, source, args.timeout)
        if job["state"] != "done":
            print(f"synthesis failed: {job.get('reason')}", file=sys.stderr)
            return 1
        [synthetic] = job["synthetic_series"]
        print(f"synthetic series {synthetic}: stored {time.monotonic() - started:.1f} s after the C-STORE")
        instances = orthanc.get(f"/series/{synthetic}/instances")
        folder = out / "synthetic"
        folder.mkdir()
        errors = []
        for instance in instances:
            path = folder / f"{instance['ID']}.dcm"
            path.write_bytes(orthanc.file(instance["ID"]))
            errors += [f"{path.name}: {line}" for line in dciodvfy_errors(path)]
        print(f"dciodvfy: {len(instances)} instances, {len(errors)} errors", *errors[:10], sep="\n  ")
        screenshot = screenshot_series(
            orthanc.url, synthetic, len(instances), out / "viewer.png", credentials=(USER, password)
        )
        print(f"screenshot of the Web Viewer: {screenshot}")
        if args.keep_running:
            print(f"browse {orthanc.url}/web-viewer/app/viewer.html?series={synthetic}; Ctrl-C stops Orthanc")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
