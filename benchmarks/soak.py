"""Soak: several app runs at once against one local Triton, whose server is killed and restarted mid-run.

    python -m benchmarks.soak [--runs 3] [--masks 2] [--steps 40] [--restarts 1]

Exports the demo model into a temporary repository, writes phantom masks and synthesises them once in process (the
reference). Then it starts a local Triton, starts --runs app processes at once (client loop; shared memory, as on
one host), and, once every run is sampling, kills the server (SIGKILL) and starts it again on the same ports,
--restarts times. Checks: every run exits 0, every volume equals the in-process one (max |difference| <= 1e-5), no
shared memory region of ours is left in /dev/shm or registered on the server, and no server process outlives the
soak. Prints each run's time beside the in-process reference's and the recoveries the runs logged; exits 1 when a
check fails. A load benchmark, bounded by its settings: not a timed test.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import tritonclient.grpc as grpcclient

from export.cli import main as export_main
from harness.local_triton import LocalTriton, server_processes
from meddpm.imaging.phantom_heads import make_phantom

REPO = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = REPO / "models" / "demo" / "model_demo.pt"
TOLERANCE = 1e-5
KILLED = "-- the server was killed here --\n"


class AppRun:
    """One `python -m app` process; its log is collected as it comes."""

    def __init__(self, masks: Path, out: Path, repository: Path, steps: int, environment: dict[str, str]):
        self.out = out
        command = [
            sys.executable,
            "-m",
            "app",
            "-i",
            str(masks),
            "-o",
            str(out),
            "-m",
            str(repository),
            "--model-name",
            "meddpm_demo",
            "--scheduler",
            "ddim",
            "--steps",
            str(steps),
            "--seed",
            "1",
            "--triton-retry-window",
            "600",
        ]
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, **environment},
            text=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stderr), daemon=True)
        self.reader.start()

    def sampling(self) -> bool:
        """Whether it has logged a step since the server was last killed (or since it started)."""
        since = max((i for i, line in enumerate(self.lines) if line == KILLED), default=-1)
        return any(": step " in line for line in self.lines[since + 1 :])

    def finish(self) -> tuple[int, float]:
        code = self.process.wait()
        self.reader.join()
        return code, time.monotonic() - self.started

    def logged(self, text: str) -> int:
        return sum(text in line for line in self.lines)


def max_difference(folder: Path, reference: Path) -> float:
    """Largest |difference| between the volumes of two output folders (inf when one is missing)."""
    worst = 0.0
    for expected in sorted(reference.glob("*/sample_*.nii.gz")):
        found = folder / expected.relative_to(reference)
        if not found.is_file():
            return float("inf")
        worst = max(worst, float(np.abs(nib.load(found).get_fdata() - nib.load(expected).get_fdata()).max()))
    return worst


def our_regions() -> list[str]:
    return glob.glob("/dev/shm/meddpm_*")


def soak(work: Path, runs: int, masks: int, steps: int, restarts: int) -> bool:
    repository, inputs = work / "repository", work / "in"
    with contextlib.redirect_stdout(io.StringIO()) as export_output:  # the export's report, printed on failure
        if export_main(["--checkpoint", str(DEMO_CHECKPOINT), "--preset", "demo", "--repository", str(repository)]):
            raise SystemExit("the demo model did not export:\n" + export_output.getvalue())
    inputs.mkdir()
    rng = np.random.default_rng(11)
    for index in range(masks):
        labels, _ = make_phantom(rng, (32, 32, 32), 6.0)
        nib.save(nib.Nifti1Image(labels, np.diag([6.0, 6.0, 6.0, 1.0])), inputs / f"head_{index}.nii.gz")

    reference = AppRun(inputs, work / "reference", repository, steps, {})
    reference_code, reference_s = reference.finish()
    if reference_code:
        raise SystemExit("the in-process reference run failed:\n" + "".join(reference.lines[-20:]))

    server = LocalTriton(repository).start()
    try:
        environment = {"TRITON_SERVER_NETLOC": server.url, "MEDDPM_TRITON_TRANSPORT": "shm"}
        apps = [AppRun(inputs, work / f"run_{index}", repository, steps, environment) for index in range(runs)]
        soak_started = time.monotonic()
        for _ in range(restarts):
            while not all(app.sampling() or app.process.poll() is not None for app in apps):
                time.sleep(0.2)
            for app in apps:
                app.lines.append(KILLED)
            server.kill()
            server.start()
        finished = [app.finish() for app in apps]
        soak_s = time.monotonic() - soak_started
        registered = list(grpcclient.InferenceServerClient(server.url).get_system_shared_memory_status().regions)
    finally:
        server.stop()

    print(
        f"soak: {runs} runs at once x {masks} mask(s), DDIM {steps} steps, demo model, shared memory, "
        f"{restarts} server kill(s) and restart(s); in-process reference {reference_s:.1f} s"
    )
    print("| run | exit code | seconds | seconds / reference | retries logged | re-registrations | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    passed = True
    for index, (app, (code, seconds)) in enumerate(zip(apps, finished)):
        difference = max_difference(app.out, work / "reference")
        passed &= code == 0 and difference <= TOLERANCE
        print(
            f"| {index} | {code} | {seconds:.1f} | {seconds / reference_s:.2f} | {app.logged('; retrying')} | "
            f"{app.logged('registered again')} | {difference:.1e} |"
        )
    for index, (app, (code, _)) in enumerate(zip(apps, finished)):
        if code:
            print(f"run {index} failed; the end of its log:\n" + "".join(app.lines[-8:]))
    leftovers = {
        "/dev/shm regions": our_regions(),
        "server registrations": registered,
        "server processes": server_processes(server.grpc_port),
    }
    print(
        f"all {runs} runs in {soak_s:.1f} s; left behind: "
        + ", ".join(f"{k} {v or 'none'}" for k, v in leftovers.items())
    )
    return passed and not any(leftovers.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="app runs at once (default 3)")
    parser.add_argument("--masks", type=int, default=2, help="phantom masks each run synthesises (default 2)")
    parser.add_argument("--steps", type=int, default=40, help="DDIM steps a mask (default 40)")
    parser.add_argument("--restarts", type=int, default=1, help="server kills and restarts (default 1)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="meddpm-soak-") as work:
        passed = soak(Path(work), args.runs, args.masks, args.steps, args.restarts)
    print("PASSED" if passed else "FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
