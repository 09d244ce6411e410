"""Orthanc Python plugin: a DICOM SEG (or a label-map series matched by a rule) that becomes stable in Orthanc is
synthesised into an MR series by the meddpm-deploy app, and the series is stored back into Orthanc.

The plugin schedules and tracks; the app (or the MAP container) does the synthesis and the DICOM writing. Each
source series carries its job's state as Orthanc metadata `MeddpmSynthesis` (JSON: state queued, running, done with
the new series' Orthanc IDs, or failed with the reason), which Orthanc's REST API and Explorer show; every change
is logged. Jobs run on a fixed number of worker threads. A series that already has a state is not queued again, so
a SEG stored twice gives one synthetic series. Jobs queued or running when Orthanc stopped are queued again when it
starts.

Runs inside Orthanc's Python (Debian's `orthanc-python`): standard library only. Configured in Orthanc's
configuration under "MeddpmSynthesis" (deploy/orthanc/README.md lists the settings); Orthanc's "UserMetadata" must
declare `MeddpmSynthesis`.
"""

import datetime
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
QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
UNFINISHED = (QUEUED, RUNNING)
REASON_CHARACTERS = 500


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
        self.jobs_folder = Path(section.get("JobsDirectory") or tempfile.gettempdir()) / "meddpm-synthesis-jobs"
        pattern = section.get("LabelMapSeriesDescription")
        self.label_map_description = re.compile(pattern) if pattern else None
        if self.identity not in ("pseudonymous", "keep-study"):
            raise ValueError(f"MeddpmSynthesis.IdentityPolicy {self.identity!r}: use pseudonymous or keep-study")
        if self.workers < 1:
            raise ValueError(f"MeddpmSynthesis.Workers {self.workers}: use 1 or more")

    @property
    def in_container(self) -> bool:
        """The command mounts the job's folders itself ({input} and {output} in it): a container, such as the MAP."""
        return any("{input}" in part for part in self.command)

    def app_command(self, input_folder: Path, output_folder: Path) -> list[str]:
        """The configured command with the job's folders: in {input}/{output} placeholders (a container's volume
        options), else as the app's -i and -o; then the model repository, DICOM output and the identity policy."""
        folders = {"input": str(input_folder), "output": str(output_folder)}
        command = [part.format(**folders) for part in self.command]
        if not self.in_container:
            command += ["-i", folders["input"], "-o", folders["output"]]
        if self.model_repository:
            command += ["-m", self.model_repository]
        return [*command, "--output-format", "dicom", "--dicom-identity", self.identity, *self.arguments]


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
        for worker in self.workers:
            worker.start()
        resumed = [series for series in _all_series() if (_state(series) or {}).get("state") in UNFINISHED]
        for series in resumed:
            orthanc.LogWarning(f"meddpm: series {series}: job left unfinished when Orthanc stopped, queued again")
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

    def on_stable_series(self, series: str) -> None:
        if self.stopping.is_set() or not self._is_mask(series):
            return
        state = _state(series)
        if state is not None:
            orthanc.LogInfo(f"meddpm: series {series} already has a synthesis job ({state['state']}); not queued again")
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
        command = self.settings.app_command(input_folder, output_folder)
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
        _set_state(series, FAILED, reason=reason[:REASON_CHARACTERS])
        orthanc.LogError(f"meddpm: series {series}: synthesis failed: {reason[:REASON_CHARACTERS]}")


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
        elif change_type == orthanc.ChangeType.STABLE_SERIES:
            JOBS.on_stable_series(resource_id)
    except Exception as error:  # noqa: BLE001 - Orthanc's change thread must go on; the error is logged
        orthanc.LogError(f"meddpm: {type(error).__name__} on change {change_type} of {resource_id}: {error}")


orthanc.RegisterOnChangeCallback(on_change)
