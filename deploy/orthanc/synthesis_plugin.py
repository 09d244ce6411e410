"""Orthanc Python plugin: a DICOM SEG (or a label-map series matched by a rule) that becomes stable in Orthanc is
synthesised into an MR series by the meddpm-deploy app, and the series is stored back into Orthanc.

The plugin schedules and tracks; the app (or the MAP container) does the synthesis and the DICOM writing. Each
source series carries its job's state as Orthanc metadata `MeddpmSynthesis` (JSON: state waiting until it is
stable, then queued, running, done with the new series' Orthanc IDs, failed with the reason, or refused when the
queue is full), which Orthanc's REST API and Explorer show; every change is logged. Jobs run on a fixed number of
worker threads, and a worker survives whatever one job raises. A series that already has a state is not queued
again, so a SEG stored twice gives one synthetic series.

Crash safety: the app dies with the Orthanc thread that started it (a SIGKILL of Orthanc included); at start, job
folders left behind are removed and the series left waiting, queued or running are queued again. A job's seed and
its DICOM identifiers are fixed by the source series (`--seed`, `--dicom-uid-seed`), so a job run again stores the
same instances, and Orthanc keeps each once: one synthetic series per SEG, however often the job was interrupted.

Runs inside Orthanc's Python (Debian's `orthanc-python`): standard library only. Configured in Orthanc's
configuration under "MeddpmSynthesis" (deploy/orthanc/README.md lists the settings); Orthanc's "UserMetadata" must
declare `MeddpmSynthesis`.
"""

import ctypes
import datetime
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import orthanc

METADATA = "MeddpmSynthesis"
WAITING, QUEUED, RUNNING, DONE, FAILED, REFUSED = "waiting", "queued", "running", "done", "failed", "refused"
UNFINISHED = (WAITING, QUEUED, RUNNING)
REASON_CHARACTERS = 500
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that forked it dies
LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the child runs as little Python as it can before exec


class Settings:
    """The "MeddpmSynthesis" section of Orthanc's configuration."""

    def __init__(self, section: dict):
        self.command = list(section.get("Command") or [])
        if not self.command:
            raise ValueError(
                'MeddpmSynthesis.Command is missing: the app to run, e.g. [".venv/bin/python", "-m", "app"]'
            )
        self.working_directory = section.get("WorkingDirectory")
        self.model_repository = section.get("ModelRepository")
        self.triton_server = section.get("TritonServer")
        self.arguments = [str(a) for a in section.get("Arguments", [])]
        self.identity = section.get("IdentityPolicy", "pseudonymous")
        self.workers = int(section.get("Workers", 1))
        self.timeout_s = float(section.get("TimeoutSeconds", 3600))
        self.max_queued = int(section.get("MaxQueuedJobs", 100))
        self.jobs_folder = Path(section.get("JobsDirectory") or tempfile.gettempdir()) / "meddpm-synthesis-jobs"
        pattern = section.get("LabelMapSeriesDescription")
        self.label_map_description = re.compile(pattern) if pattern else None
        if self.identity not in ("pseudonymous", "keep-study"):
            raise ValueError(f"MeddpmSynthesis.IdentityPolicy {self.identity!r}: use pseudonymous or keep-study")
        if self.workers < 1:
            raise ValueError(f"MeddpmSynthesis.Workers {self.workers}: use 1 or more")
        if self.max_queued < 1:
            raise ValueError(f"MeddpmSynthesis.MaxQueuedJobs {self.max_queued}: use 1 or more")

    @property
    def in_container(self) -> bool:
        """The command mounts the job's folders itself ({input} and {output} in it): a container, such as the MAP."""
        return any("{input}" in part for part in self.command)

    def app_command(self, series: str, input_folder: Path, output_folder: Path) -> list[str]:
        """The configured command with the job's folders: in {input}/{output} placeholders (a container's volume
        options), else as the app's -i and -o; then the model repository, DICOM output, the identity policy, and
        the job's own seed (unless the configured arguments set one) and DICOM identifiers, both fixed by the
        source series (its Orthanc ID, a hash: no patient data)."""
        folders = {"input": str(input_folder), "output": str(output_folder)}
        command = [part.format(**folders) for part in self.command]
        if not self.in_container:
            command += ["-i", folders["input"], "-o", folders["output"]]
        if self.model_repository:
            command += ["-m", self.model_repository]
        command += ["--output-format", "dicom", "--dicom-identity", self.identity, "--dicom-uid-seed", series]
        if "--seed" not in self.arguments:
            command += ["--seed", str(int(hashlib.sha256(series.encode()).hexdigest()[:8], 16))]
        return [*command, *self.arguments]


class SynthesisJobs:
    """The queue of series to synthesise and the worker threads that run the app on them."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.pending: queue.Queue = queue.Queue()
        self.queued: set[str] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.running: dict[str, subprocess.Popen] = {}
        self.workers = [
            threading.Thread(target=self._work, name=f"meddpm-{i}", daemon=True) for i in range(settings.workers)
        ]

    def start(self) -> None:
        """Remove the job folders a crash left (they hold patient data), then queue again every series left
        waiting, queued or running when Orthanc stopped, and start the workers."""
        if self.settings.jobs_folder.is_dir():
            left = [path for path in self.settings.jobs_folder.iterdir() if path.is_dir()]
            for path in left:
                shutil.rmtree(path, ignore_errors=True)
            if left:
                orthanc.LogWarning(f"meddpm: removed {len(left)} job folder(s) left by an earlier run")
        for worker in self.workers:
            worker.start()
        resumed = [series for series in _all_series() if (_state(series) or {}).get("state") in UNFINISHED]
        for series in resumed:
            orthanc.LogWarning(f"meddpm: series {series}: job left unfinished when Orthanc stopped, queued again")
            _set_state(series, QUEUED)
            self._enqueue(series)

    def stop(self) -> None:
        """Stop the workers; a running app is stopped and its job stays `running`, to be resumed at the next start."""
        self.stopping.set()
        with self.lock:
            processes = list(self.running.values())
        for process in processes:
            _stop(process)
        for _ in self.workers:
            self.pending.put(None)
        for worker in self.workers:
            worker.join(timeout=30)

    def on_new_series(self, series: str) -> None:
        """A mask series starts arriving: marked `waiting`, so that a stop before it is stable does not lose it."""
        if not self.stopping.is_set() and _state(series) is None and self._is_mask(series):
            _set_state(series, WAITING)

    def on_stable_series(self, series: str) -> None:
        if self.stopping.is_set() or not self._is_mask(series):
            return
        state = _state(series)
        if state is not None and state["state"] != WAITING:
            orthanc.LogInfo(f"meddpm: series {series} already has a synthesis job ({state['state']}); not queued again")
            return
        with self.lock:
            full = len(self.queued) >= self.settings.max_queued
        if full:
            reason = (
                f"{self.settings.max_queued} jobs are queued or running (MaxQueuedJobs); once there is room, delete "
                f"this state (DELETE /series/{series}/metadata/{METADATA}) and store the series again"
            )
            _set_state(series, REFUSED, reason=reason)
            orthanc.LogError(f"meddpm: series {series}: synthesis refused: {reason}")
            return
        _set_state(series, QUEUED)
        orthanc.LogWarning(f"meddpm: series {series}: synthesis queued")
        self._enqueue(series)

    def _is_mask(self, series: str) -> bool:
        tags = _get(f"/series/{series}").get("MainDicomTags", {})
        if tags.get("Modality") == "SEG":
            return True
        pattern = self.settings.label_map_description
        return bool(pattern and pattern.fullmatch(tags.get("SeriesDescription", "")))

    def _enqueue(self, series: str) -> None:
        with self.lock:
            if series in self.queued:
                return
            self.queued.add(series)
        self.pending.put(series)

    def _work(self) -> None:
        while not self.stopping.is_set():
            series = self.pending.get()
            if series is None:
                return
            try:
                self._run(series)
            except Exception as error:  # noqa: BLE001 - a job's failure must be recorded, whatever it was
                if not self.stopping.is_set():
                    self._fail(series, f"{type(error).__name__}: {error}")
            finally:
                with self.lock:
                    self.queued.discard(series)

    def _run(self, series: str) -> None:
        started = time.monotonic()
        _set_state(series, RUNNING)
        orthanc.LogWarning(f"meddpm: series {series}: synthesis running")
        self.settings.jobs_folder.mkdir(parents=True, exist_ok=True)
        job = Path(tempfile.mkdtemp(prefix=f"{series[:8]}-", dir=self.settings.jobs_folder))
        try:
            input_folder, output_folder = job / "input", job / "output"
            input_folder.mkdir()
            output_folder.mkdir()
            if self.settings.in_container:
                output_folder.chmod(0o777)  # the image's user (the MAP's: holoscan, 1000) writes there
            for index, instance in enumerate(_get(f"/series/{series}/instances")):
                (input_folder / f"{index:05d}.dcm").write_bytes(orthanc.RestApiGet(f"/instances/{instance['ID']}/file"))
            result = self._run_app(series, input_folder, output_folder)
            if result is None:
                return  # stopped with Orthanc: left `running`, resumed at the next start
            written = sorted(output_folder.rglob("*.dcm"))
            if result.returncode != 0 or not written:  # a MAP's entry point exits 0 whatever the app did
                self._fail(series, _reason(result))
                return
            stored = sorted({_store(path) for path in written})
            seconds = round(time.monotonic() - started, 1)
            _set_state(series, DONE, synthetic_series=stored, seconds=seconds)
            orthanc.LogWarning(f"meddpm: series {series}: synthetic series {', '.join(stored)} stored in {seconds} s")
        finally:
            shutil.rmtree(job, ignore_errors=True)

    def _run_app(self, series: str, input_folder: Path, output_folder: Path) -> subprocess.CompletedProcess | None:
        command = self.settings.app_command(series, input_folder, output_folder)
        environment = dict(os.environ, HOLOSCAN_LOG_LEVEL="WARN")
        if self.settings.triton_server:
            environment["TRITON_SERVER_NETLOC"] = self.settings.triton_server
        process = subprocess.Popen(
            command,
            cwd=self.settings.working_directory,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )
        with self.lock:
            self.running[series] = process
        try:
            stdout, stderr = process.communicate(timeout=self.settings.timeout_s)
        except subprocess.TimeoutExpired:
            _stop(process)
            stdout, stderr = process.communicate()
            return subprocess.CompletedProcess(
                command, -1, stdout, f"error: no result within {self.settings.timeout_s:g} s"
            )
        finally:
            with self.lock:
                self.running.pop(series, None)
        if self.stopping.is_set():
            return None
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

    def _fail(self, series: str, reason: str) -> None:
        """Record the failure on the series; a series that is gone (deleted, or recycled by Orthanc) is logged only:
        the worker goes on to the next job."""
        orthanc.LogError(f"meddpm: series {series}: synthesis failed: {reason[:REASON_CHARACTERS]}")
        try:
            _set_state(series, FAILED, reason=reason[:REASON_CHARACTERS])
        except Exception as error:  # noqa: BLE001 - whatever Orthanc says, this worker must live on
            orthanc.LogError(f"meddpm: series {series}: its state cannot be recorded ({type(error).__name__})")


def _die_with_parent(parent: int):
    """What the app's process runs before exec: SIGTERM when the thread that started it dies (Orthanc stopped, or
    killed), and an exit at once if Orthanc died before this could be set."""

    def set_death_signal() -> None:
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return set_death_signal


def _reason(result: subprocess.CompletedProcess) -> str:
    """What the app said went wrong: its error line, or its summary's FAILED lines, else its last words."""
    lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines() if line.strip()]
    said = [line for line in lines if line.startswith(("error:", "FAILED"))]
    return f"exit code {result.returncode}: " + ("; ".join(said) if said else (lines[-1] if lines else "no output"))


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the app's process group (the app stops between steps), SIGKILL if it lingers."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _get(uri: str):
    return json.loads(orthanc.RestApiGet(uri))


def _all_series() -> list[str]:
    return _get("/series")


def _state(series: str) -> dict | None:
    try:
        return json.loads(orthanc.RestApiGet(f"/series/{series}/metadata/{METADATA}"))
    except orthanc.OrthancException:
        return None


def _set_state(series: str, state: str, **details) -> None:
    record = {"state": state, "updated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    orthanc.RestApiPut(f"/series/{series}/metadata/{METADATA}", json.dumps({**record, **details}))


def _store(path: Path) -> str:
    """Store one instance into Orthanc; its series' Orthanc ID."""
    return json.loads(orthanc.RestApiPost("/instances", path.read_bytes()))["ParentSeries"]


def _configure() -> SynthesisJobs | None:
    configuration = json.loads(orthanc.GetConfiguration())
    if METADATA not in configuration.get("UserMetadata", {}):
        orthanc.LogError(f'meddpm: Orthanc\'s "UserMetadata" must declare "{METADATA}" (e.g. 4201); plugin disabled')
        return None
    try:
        return SynthesisJobs(Settings(configuration.get(METADATA, {})))
    except (ValueError, re.error) as error:
        orthanc.LogError(f"meddpm: {error}; plugin disabled")
        return None


JOBS = _configure()


def on_change(change_type, level, resource_id):
    if JOBS is None:
        return
    try:
        if change_type == orthanc.ChangeType.ORTHANC_STARTED:
            JOBS.start()
        elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
            JOBS.stop()
        elif change_type == orthanc.ChangeType.NEW_SERIES:
            JOBS.on_new_series(resource_id)
        elif change_type == orthanc.ChangeType.STABLE_SERIES:
            JOBS.on_stable_series(resource_id)
    except Exception as error:  # noqa: BLE001 - Orthanc's change thread must go on; the error is logged
        orthanc.LogError(f"meddpm: {type(error).__name__} on change {change_type} of {resource_id}: {error}")


orthanc.RegisterOnChangeCallback(on_change)
