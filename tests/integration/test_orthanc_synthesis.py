"""The Orthanc plugin (deploy/orthanc/synthesis_plugin.py) in a real Orthanc: a SEG stored by C-STORE comes back as a
synthetic MR series without any other step; the job's state is Orthanc metadata on the SEG's series."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid

from harness.dciodvfy import dciodvfy_errors
from harness.viewer import screenshot_series
from meddpm.dicom.phantom_study import phantom_study
from meddpm.errors import PacsError
from tests.conftest import REPO
from tests.dicom_samples import PATIENT, leaked_values
from tests.helpers import app_command
from tests.orthanc import MODALITIES, PASSWORD, USER, OrthancServer, c_store

METADATA = "MeddpmSynthesis"
JOB_SECONDS = 240  # app start-up (~15 s) and a short run on a shared 2-core machine, with a wide margin


def synthesis_orthanc(
    folder, repository, identity: str, arguments: list[str], extra: dict | None = None, **settings
) -> OrthancServer:
    """Orthanc as shipped, with the synthesis plugin running the app from this checkout on the demo model;
    `settings` override the plugin's (e.g. Workers), `extra` Orthanc's (e.g. StableAge)."""
    return OrthancServer(
        folder,
        extra,
        synthesis={
            "Command": app_command(),
            "WorkingDirectory": str(REPO),
            "ModelRepository": str(repository),
            "IdentityPolicy": identity,
            "Arguments": ["--seed", "1", *arguments],
            "Workers": 2,
            "JobsDirectory": str(folder / "jobs"),
            "LabelMapSeriesDescription": "LABELS .*",
            **settings,
        },
    )


@pytest.fixture(scope="module")
def pacs(demo_repository, tmp_path_factory):
    server = synthesis_orthanc(
        tmp_path_factory.mktemp("orthanc"),
        demo_repository,
        "pseudonymous",
        ["--scheduler", "dpmpp2m-sde"],
    )
    yield server
    server.stop()


def job_state(server: OrthancServer, series: str) -> dict | None:
    response = requests.get(f"{server.url}/series/{series}/metadata/{METADATA}", auth=(USER, PASSWORD), timeout=10)
    return response.json() if response.ok else None


def wait_for(server: OrthancServer, series: str, states: tuple[str, ...], timeout_s: float = JOB_SECONDS) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job_state(server, series)
        if state and state["state"] in states:
            return state
        time.sleep(0.5)
    pytest.fail(f"series {series}: no state in {states} within {timeout_s} s: {job_state(server, series)}\n"
                f"{server.log.read_text()[-3000:]}")  # fmt: skip


def synthetic_instances(server: OrthancServer, series: str) -> list[pydicom.Dataset]:
    return [dcmread(DicomBytesIO(server.file(i["ID"]))) for i in server.get(f"/series/{series}/instances")]


@pytest.fixture(scope="module")
def synthesised(pacs):
    """A phantom MR study and its SEG stored by C-STORE, and the finished job: (SEG, source series, its state)."""
    mr, seg = phantom_study(5, PATIENT)
    started = time.monotonic()
    c_store(pacs, [*mr, seg])
    source = pacs.series_id(seg.SeriesInstanceUID)
    done = wait_for(pacs, source, ("done", "failed"))
    print(f"C-STORE to synthetic series stored: {time.monotonic() - started:.1f} s (job {done.get('seconds')} s)")
    return seg, source, done


def test_a_stored_seg_comes_back_as_a_synthetic_series(pacs, synthesised, tmp_path):
    seg, source, done = synthesised
    assert done["state"] == "done", done
    [synthetic] = done["synthetic_series"]
    instances = synthetic_instances(pacs, synthetic)
    assert len(instances) == 32 and {ds.Modality for ds in instances} == {"MR"}
    first = instances[0]
    assert first.SyntheticData == "YES" and first.SourceImageSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    # pseudonymous: a new patient and study, nothing of the source's patient data
    assert first.StudyInstanceUID != seg.StudyInstanceUID and first.PatientID.startswith("SYN-")
    path = tmp_path / "synthetic.dcm"
    first.save_as(path)
    assert dciodvfy_errors(path) == []
    for ds in instances:
        assert leaked_values(ds) == []
    log = pacs.log.read_text()
    assert f"series {source}: synthesis queued" in log and f"synthetic series {synthetic} stored" in log

    # the same SEG stored again: no second job, still one synthetic series
    c_store(pacs, [seg])
    time.sleep(5)  # StableAge is 1 s: a second stable event would have come by now
    assert job_state(pacs, source) == done
    assert len(pacs.get(f"/studies/{pacs.get(f'/series/{synthetic}')['ParentStudy']}/series")) == 1


def test_the_synthetic_series_is_drawn_in_the_web_viewer(pacs, synthesised, tmp_path):
    """A real browser opens the series in Orthanc's Web Viewer; the drawn image shows a head: not blank, and its
    middle brighter than its border (the background)."""
    [synthetic] = synthesised[2]["synthetic_series"]
    path = screenshot_series(pacs.url, synthetic, 32, tmp_path / "viewer.png", credentials=(USER, PASSWORD))
    grey = np.asarray(Image.open(path).convert("L"), dtype=float)
    height, width = grey.shape
    middle = grey[height // 3 : 2 * height // 3, width // 3 : 2 * width // 3]
    border = np.concatenate([grey[: height // 10].ravel(), grey[-height // 10 :].ravel()])
    assert grey.std() > 20, f"a blank image: {path}"
    assert middle.mean() > border.mean() + 40, (middle.mean(), border.mean(), path)


def test_two_segs_at_once_both_complete(pacs):
    studies = [phantom_study(seed) for seed in (11, 12)]
    c_store(pacs, [ds for mr, seg in studies for ds in (*mr, seg)])
    sources = [pacs.series_id(seg.SeriesInstanceUID) for _, seg in studies]
    states = [wait_for(pacs, source, ("done", "failed")) for source in sources]
    assert [state["state"] for state in states] == ["done", "done"], states
    assert len({series for state in states for series in state["synthetic_series"]}) == 2


def test_a_label_map_series_matched_by_the_rule_is_synthesised(pacs):
    """An image series of label values whose description matches LabelMapSeriesDescription is a mask too; an MR
    series that does not match is left alone."""
    mr, _ = phantom_study(41, PATIENT)
    labels = [copy.deepcopy(ds) for ds in mr]
    label_uid = generate_uid()
    for ds in labels:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = label_uid, 60, "LABELS brain tumour"
        ds.PixelData = (np.frombuffer(ds.PixelData, np.uint16) // 400).astype(np.uint16).tobytes()  # 400 per label
    c_store(pacs, [*mr, *labels])
    done = wait_for(pacs, pacs.series_id(label_uid), ("done", "failed"))
    assert done["state"] == "done", done
    time.sleep(3)  # the MR series became stable too
    assert job_state(pacs, pacs.series_id(mr[0].SeriesInstanceUID)) is None


def test_a_bad_seg_ends_failed_with_its_reason(pacs):
    mr, seg = phantom_study(21, PATIENT)
    bad = copy.deepcopy(seg)
    bad.Rows, bad.Columns = 1000, 1000  # pixel data far too short for the frames it claims
    c_store(pacs, [bad])
    source = pacs.series_id(bad.SeriesInstanceUID)
    failed = wait_for(pacs, source, ("done", "failed"))
    assert failed["state"] == "failed"
    assert "need 8000000 bytes of pixel data" in failed["reason"], failed
    assert f"series {source}: synthesis failed" in pacs.log.read_text()


def test_a_job_survives_an_orthanc_restart_and_keeps_the_study(demo_repository, tmp_path):
    """DDPM 250 steps, so that the job is still running when Orthanc stops; keep-study files the synthetic series
    into the SEG's study, with its patient."""
    server = synthesis_orthanc(tmp_path, demo_repository, "keep-study", [])
    try:
        mr, seg = phantom_study(31, PATIENT)
        c_store(server, [*mr, seg])
        source = server.series_id(seg.SeriesInstanceUID)
        wait_for(server, source, ("running",))
        time.sleep(3)  # the app is under way
        server.stop()
        server.start()
        done = wait_for(server, source, ("done", "failed"), timeout_s=2 * JOB_SECONDS)
        assert done["state"] == "done", done
        [synthetic] = done["synthetic_series"]
        first = synthetic_instances(server, synthetic)[0]
        assert first.StudyInstanceUID == seg.StudyInstanceUID and first.PatientID == seg.PatientID
        assert first.PatientIdentityRemoved == "NO"
        assert "queued again" in server.log.read_text()
    finally:
        server.stop()


def test_the_pacs_demo_script(tmp_path):
    """scripts/pacs_demo.sh as the README runs it: the synthetic series, a clean dciodvfy and the screenshot."""
    result = subprocess.run(
        [REPO / "scripts" / "pacs_demo.sh", "--out", tmp_path / "demo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^synthetic series [0-9a-f-]{44}: stored [\d.]+ s after the C-STORE$", result.stdout, re.M)
    assert "dciodvfy: 32 instances, 0 errors" in result.stdout
    assert f"screenshot of the Web Viewer: {tmp_path / 'demo' / 'viewer.png'}" in result.stdout
    assert (tmp_path / "demo" / "viewer.png").stat().st_size > 10_000
    assert list((tmp_path / "demo" / "jobs").glob("*/*")) == []  # each job's folder is removed


# --- a site's PACS: closed to strangers, bounded, crash-safe ----------------------------------------------------


def test_the_shipped_configuration_refuses_strangers(pacs, tmp_path):
    """Orthanc as deploy/orthanc/orthanc.json ships it: no REST answer without credentials, no C-STORE from an AE
    title that is not a registered modality, and no association that calls another AE title than its own."""
    assert requests.get(f"{pacs.url}/system", timeout=10).status_code == 401
    assert requests.get(f"{pacs.url}/system", auth=(USER, "wrong"), timeout=10).status_code == 401
    mr, seg = phantom_study(51)
    with pytest.raises(PacsError, match="refused"):
        pacs.c_store([seg], "STRANGER")
    with pytest.raises(PacsError, match="refused"):
        pacs.c_store([seg], MODALITIES["tests"], called_ae="NOT-ORTHANC")
    lookup = requests.post(f"{pacs.url}/tools/lookup", data=seg.SeriesInstanceUID, auth=(USER, PASSWORD), timeout=10)
    assert lookup.json() == []  # nothing of it was stored


def app_processes(jobs: Path) -> list[int]:
    """Pids of the app processes running a job under `jobs` (their command line names the job's folder)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            arguments = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"app" in arguments and any(str(jobs).encode() in a for a in arguments):
            found.append(int(cmdline.parent.name))
    return found


def wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    pytest.fail(f"not within {timeout_s} s: {what}")


def synthetic_series_of(server: OrthancServer) -> list[str]:
    """Every synthetic series Orthanc holds."""
    return [
        s["ID"]
        for s in server.get("/series?expand")
        if s["MainDicomTags"].get("SeriesDescription", "").startswith("SYNTHETIC")
    ]


def test_a_full_queue_refuses_and_a_vanished_series_does_not_stop_the_worker(demo_repository, tmp_path):
    """One worker, at most two jobs queued or running: a third SEG is refused, visibly; the queued SEG's series is
    deleted before its turn, and the worker survives that job and does the next SEG."""
    slow = ["--scheduler", "ddim", "--steps", "40"]  # a job that outlasts the stores below
    server = synthesis_orthanc(tmp_path, demo_repository, "pseudonymous", slow, Workers=1, MaxQueuedJobs=2)
    try:
        (_, running), (_, queued), (_, refused), (_, later) = (phantom_study(seed) for seed in (61, 62, 63, 64))
        c_store(server, [running])
        first = server.series_id(running.SeriesInstanceUID)
        wait_for(server, first, ("running",))
        c_store(server, [queued])
        gone = server.series_id(queued.SeriesInstanceUID)
        wait_for(server, gone, ("queued",))
        c_store(server, [refused])
        state = wait_for(server, server.series_id(refused.SeriesInstanceUID), ("refused",))
        assert "2 jobs are queued or running (MaxQueuedJobs)" in state["reason"], state
        requests.delete(f"{server.url}/series/{gone}", auth=(USER, PASSWORD), timeout=10).raise_for_status()
        assert wait_for(server, first, ("done", "failed"))["state"] == "done"
        # the worker's next job is the deleted series: it fails, and its failure cannot even be recorded
        unrecorded = f"series {gone}: its state cannot be recorded"
        wait_until(lambda: unrecorded in server.log.read_text(), JOB_SECONDS, unrecorded)
        c_store(server, [later])
        assert wait_for(server, server.series_id(later.SeriesInstanceUID), ("done", "failed"))["state"] == "done"
    finally:
        server.stop()


def test_after_sigkills_no_app_outlives_orthanc_no_job_folder_stays_and_each_seg_gets_one_series(
    demo_repository, tmp_path
):
    """Real SIGKILLs of Orthanc: (1) while a SEG is still arriving (never stable before the kill): it is found and
    queued at the next start; (2) while its job's app runs: the app dies with Orthanc, and its job folder (a copy of
    the SEG) is removed at the next start, where the job runs again; (3) after the job stored its series but before
    its state said so: the job runs again and stores the same instances, which Orthanc keeps once."""
    slow = ["--scheduler", "ddim", "--steps", "40"]
    server = synthesis_orthanc(tmp_path, demo_repository, "pseudonymous", slow, {"StableAge": 3600}, Workers=1)
    jobs = tmp_path / "jobs"
    try:
        _, seg = phantom_study(71, PATIENT)
        c_store(server, [seg])
        source = server.series_id(seg.SeriesInstanceUID)
        wait_for(server, source, ("waiting",))  # StableAge is an hour: only a restart can queue it
        server.kill()
        server.start()
        wait_for(server, source, ("running",))
        [app] = wait_until(lambda: app_processes(jobs), 60, "the job's app running")
        [job_folder] = [path for path in (jobs / "meddpm-synthesis-jobs").iterdir()]
        server.kill()
        wait_until(lambda: not Path(f"/proc/{app}").exists(), 60, f"app {app} ended after Orthanc's SIGKILL")
        assert job_folder.is_dir()  # what the crash left: a copy of the SEG
        # it was stopped, not left to finish: killed as it started, it wrote nothing (an orphan would have)
        assert not list((job_folder / "output").rglob("*.dcm"))
        server.start()
        wait_until(lambda: not job_folder.exists(), 60, f"{job_folder} removed at start")
        done = wait_for(server, source, ("done", "failed"), timeout_s=2 * JOB_SECONDS)
        assert done["state"] == "done", done
        [synthetic] = done["synthetic_series"]
        assert synthetic_series_of(server) == [synthetic]
        instances = {i["ID"] for i in server.get(f"/series/{synthetic}/instances")}
        assert len(instances) == 32

        # (3) the job's series stored, its state not yet written: the crash leaves it `running`
        state = json.dumps({"state": "running", "updated": done["updated"]})
        requests.put(f"{server.url}/series/{source}/metadata/{METADATA}", data=state, auth=(USER, PASSWORD))
        server.kill()
        server.start()
        again = wait_for(server, source, ("done", "failed"), timeout_s=2 * JOB_SECONDS)
        assert again["state"] == "done" and again["synthetic_series"] == [synthetic], again
        assert synthetic_series_of(server) == [synthetic]
        assert {i["ID"] for i in server.get(f"/series/{synthetic}/instances")} == instances
        assert app_processes(jobs) == [] and list((jobs / "meddpm-synthesis-jobs").iterdir()) == []
    finally:
        server.kill()
