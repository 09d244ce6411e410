"""One timed run of a command (the app, or an import), as the start-up and full-size benchmarks measure it."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import time
from pathlib import Path

FIRST_STEP = re.compile(r"step 1/\d+")  # the app's first progress line (INFO): the first UNet call is done


@dataclasses.dataclass
class TimedRun:
    wall_s: float
    first_step_s: float | None  # until the first line matching `first_line`, if one was asked for and seen
    peak_rss_mib: float  # the command's own peak resident memory (its waited-for children's included)
    output: str  # stdout and stderr, interleaved


def timed_run(
    command: list[str], cwd: Path, env: dict[str, str] | None = None, first_line: re.Pattern | None = None
) -> TimedRun:
    """Run `command` to its end; RuntimeError with its output's tail if it fails."""
    environment = {"HOLOSCAN_LOG_LEVEL": "WARN", "PYTHONWARNINGS": "ignore", **os.environ, **(env or {})}
    started, seen, lines = time.perf_counter(), None, []
    process = subprocess.Popen(
        command, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if seen is None and first_line is not None and first_line.search(line):
            seen = time.perf_counter() - started
    _, status, usage = os.wait4(process.pid, 0)  # this child's own peak, not the largest of every child so far
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    output = "".join(lines)
    if process.returncode:
        raise RuntimeError(f"{' '.join(map(str, command))} failed (exit {process.returncode}):\n{output[-3000:]}")
    return TimedRun(wall, seen, usage.ru_maxrss / 1024, output)


def cpu_model() -> str:
    """The CPU's name as /proc/cpuinfo gives it (the machines differ from session to session)."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
