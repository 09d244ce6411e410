"""The Orthanc plugin (deploy/orthanc/synthesis_plugin.py) in a real Orthanc: a SEG stored by C-STORE comes back as a
synthetic MR series without any other step; the job's state is Orthanc metadata on the SEG's series."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import time

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
from tests.conftest import REPO
from tests.dicom_samples import PATIENT, leaked_values
from tests.orthanc import PASSWORD, USER, OrthancServer, c_store

SYNTHESIS_PLUGIN = REPO / "deploy" / "orthanc" / "synthesis_plugin.py"
METADATA = "MeddpmSynthesis"
JOB_SECONDS = 240  # app start-up (~15 s) and a short run on a shared 2-core machine, with a wide margin


def synthesis_orthanc(folder, repository, identity: str, arguments: list[str]) -> OrthancServer:
    """Orthanc with the synthesis plugin running the app from this checkout on the demo model."""
    return OrthancServer(
        folder,
        extra={
            "PythonScript": str(SYNTHESIS_PLUGIN),
            "UserMetadata": {METADATA: 4201},
            METADATA: {
                "Command": [sys.executable, "-m", "app"],
                "WorkingDirectory": str(REPO),
                "ModelRepository": str(repository),
                "IdentityPolicy": identity,
                "Arguments": ["--seed", "1", *arguments],
                "Workers": 2,
                "JobsDirectory": str(folder / "jobs"),
                "LabelMapSeriesDescription": "LABELS .*",
            },
        },
        plugins=("libOrthancPython.so", "libOrthancWebViewer.so"),
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
