"""The PACS path against a real Orthanc: a SEG stored in Orthanc, fetched, synthesised, pushed back, queried."""

from __future__ import annotations

import json
import logging

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from requests import Session

from harness.dciodvfy import dciodvfy_errors
from meddpm.dicom.options import CStoreDestination, DicomOptions
from meddpm.dicom.pacs import PacsExporter, dicomweb_credentials
from meddpm.dicom.phantom_study import image_series, oblique_affine, segmentation
from meddpm.dicom.reader import read_dicom_mask
from meddpm.dicom.writer import Provenance, study_identity, write_series
from meddpm.errors import ConfigurationError, PacsError
from meddpm.imaging.phantom_heads import make_phantom
from meddpm.input_folders import find_mask_inputs
from meddpm.model.presets import BUILTIN_PRESETS, load_presets
from tests.dicom_samples import leaked_values, save, study
from tests.helpers import run_app
from tests.orthanc import AE_TITLE, MODALITIES, PASSWORD, USER, OrthancServer, c_store

PRESET = load_presets(BUILTIN_PRESETS)["demo"]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def source(orthanc):
    """A phantom MR series with patient data and its SEG, stored in Orthanc by C-STORE as a scanner would."""
    labels, _ = make_phantom(np.random.default_rng(5), (32, 32, 32), 6.0)
    source_study = study()
    mr = image_series(labels.astype(np.uint16) * 400, oblique_affine(labels.shape, 6.0), source_study, 3, "T1")
    seg = segmentation(mr, labels)
    c_store(orthanc, [*mr, seg])
    return labels, source_study, mr, seg


def dicomweb(orthanc) -> DICOMwebClient:
    session = Session()
    session.auth = (USER, PASSWORD)
    return DICOMwebClient(url=orthanc.dicomweb_url, session=session)


def find_series(orthanc, study_uid: str) -> list[Dataset]:
    """C-FIND at series level in one study, as a PACS client would ask."""
    ae = AE(ae_title=MODALITIES["tests"])
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = query.SeriesDescription = query.Modality = ""
    query.NumberOfSeriesRelatedInstances = ""
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=AE_TITLE)
    assert assoc.is_established
    found = [
        identifier
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        if status and status.Status in (0xFF00, 0xFF01)
    ]
    assoc.release()
    return found


def test_mask_from_orthanc_comes_back_as_a_valid_synthetic_series(demo_repository, orthanc, source, tmp_path):
    labels, source_study, mr, seg = source
    client = dicomweb(orthanc)
    # Orthanc routes the study to the app: fetched here by WADO-RS into the app's input folder (MR and SEG)
    inputs = tmp_path / "input"
    fetched = client.retrieve_study(source_study.StudyInstanceUID)
    assert len(fetched) == 33
    save(fetched, inputs, "instance")

    credentials = tmp_path / "dicomweb-credentials"
    credentials.write_text(f"{USER}:{PASSWORD}\n")
    out = tmp_path / "output"
    result = run_app(
        "-i",
        inputs,
        "-o",
        out,
        "-m",
        demo_repository,
        "-l",
        "DEBUG",
        "--scheduler",
        "ddim",
        "--steps",
        "3",
        "--seed",
        "11",
        "--output-format",
        "nifti,dicom",
        "--pacs-cstore",
        f"{AE_TITLE}@127.0.0.1:{orthanc.dicom_port}",
        "--pacs-calling-ae",
        MODALITIES["meddpm"],
        "--pacs-stow-url",
        orthanc.dicomweb_url,
        env={"MEDDPM_DICOMWEB_CREDENTIALS_FILE": str(credentials)},
        timeout=600,
    )
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs
    [folder] = list(out.iterdir())
    stored = json.loads((folder / "pacs.json").read_text())
    assert stored["c-store"]["instances"] == 32 and stored["stow-rs"]["instances"] == 32, stored
    written = sorted((folder / "dicom" / "sample_0_T1").iterdir())
    synthetic_study = pydicom.dcmread(written[0]).StudyInstanceUID
    assert synthetic_study != source_study.StudyInstanceUID

    # queried back: QIDO-RS and C-FIND both see one MR series of 32 instances in a new study
    [series] = client.search_for_series(
        search_filters={"StudyInstanceUID": synthetic_study},
        fields=["NumberOfSeriesRelatedInstances", "SeriesDescription"],
    )
    assert series["00201209"]["Value"] == [32] and series["00080060"]["Value"] == ["MR"]
    assert series["0008103E"]["Value"][0].startswith("SYNTHETIC T1")
    [found] = find_series(orthanc, synthetic_study)
    assert int(found.NumberOfSeriesRelatedInstances) == 32 and found.Modality == "MR"

    # fetched back from Orthanc: valid, synthetic, on the source's geometry, and anonymous
    returned = client.retrieve_series(synthetic_study, series["0020000E"]["Value"][0])
    saved = save(sorted(returned, key=lambda ds: int(ds.InstanceNumber)), tmp_path / "returned", "synthetic")
    for path in saved:
        assert dciodvfy_errors(path) == [], path
    for ds, source_slice in zip(returned, sorted(mr, key=lambda ds: ds.InstanceNumber)):
        assert ds.SyntheticData == "YES" and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert (
            ds.BurnedInAnnotation == "NO" and ds.SourceImageSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        )
        # the source's slice plane (the in-plane axes are in display order: tests/unit/test_dicom.py)
        normal = np.cross(*np.reshape([float(v) for v in ds.ImageOrientationPatient], (2, 3)))
        offset = np.subtract([float(v) for v in ds.ImagePositionPatient], source_slice.ImagePositionPatient)
        assert abs(offset @ normal) < 1e-4
    assert returned[0].PatientID.startswith("SYN-")
    assert leaked_values(logs) == []
    for path in saved + [p for p in folder.rglob("*") if p.is_file()]:
        assert leaked_values(path) == [], path


def test_pacs_settings_are_checked_before_any_work(demo_repository, tmp_path):
    result = run_app(
        "-i", tmp_path, "-o", tmp_path / "out", "-m", demo_repository, "--pacs-cstore", "ORTHANC@127.0.0.1:4242"
    )
    assert result.returncode == 2 and "add --output-format nifti,dicom" in result.stderr, result.stderr
    result = run_app(
        "-i",
        tmp_path,
        "-o",
        tmp_path / "out",
        "-m",
        demo_repository,
        "--output-format",
        "dicom",
        "--pacs-stow-url",
        "http://user:secret-pw-42@127.0.0.1:1/dicom-web",
    )
    assert result.returncode == 2 and "holds credentials" in result.stderr and "secret-pw-42" not in result.stderr


def test_a_pacs_that_refuses_keeps_the_output_and_says_why(demo_repository, orthanc, source, tmp_path):
    save([source[3]], tmp_path / "input", "seg")
    out = tmp_path / "output"
    result = run_app(
        "-i",
        tmp_path / "input",
        "-o",
        out,
        "-m",
        demo_repository,
        "--scheduler",
        "ddim",
        "--steps",
        "3",
        "--output-format",
        "dicom",
        "--pacs-cstore",
        f"{AE_TITLE}@127.0.0.1:{orthanc.dicom_port}",
        "--pacs-calling-ae",
        "STRANGER",
        "--pacs-retries",
        "0",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    [folder] = list(out.iterdir())
    assert (
        f"written to {folder}, but not stored in the PACS" in result.stdout and "register 'STRANGER'" in result.stdout
    )
    assert "register 'STRANGER'" in json.loads((folder / "pacs.json").read_text())["error"]
    assert len(list((folder / "dicom" / "sample_0_T1").iterdir())) == 32


def write_synthetic(tmp_path, seg, options: DicomOptions | None = None):
    """A synthetic series written without the app, for the exporter tests."""
    save([seg], tmp_path / "in", "seg")
    mask = read_dicom_mask(find_mask_inputs(tmp_path / "in")[0], PRESET, None)
    volume = np.random.default_rng(1).uniform(-1, 1, mask.labels.shape).astype(np.float32)
    return write_series(
        tmp_path / "out",
        volume,
        mask.affine,
        identity=study_identity(mask.dicom, options or DicomOptions()),
        source=mask.dicom,
        written_range=(-1.0, 1.0),
        series_number=1001,
        channel="T1",
        seed=1,
        provenance=Provenance("meddpm_demo", "demo", "ddim", 3, "test"),
    )


def exporter(orthanc, **overrides) -> PacsExporter:
    settings = {
        "cstore": CStoreDestination("ORTHANC", "127.0.0.1", orthanc.dicom_port),
        "calling_ae": "MEDDPM",
        "stow_url": None,
        "retries": 0,
        "credentials": None,
        "pause_s": 0.01,
    }
    return PacsExporter(**{**settings, **overrides})


def test_keep_study_files_the_series_into_the_source_study(orthanc, source, tmp_path):
    _, source_study, _, seg = source
    files = write_synthetic(tmp_path, seg, DicomOptions("keep-study"))
    assert exporter(orthanc).store([files])["c-store"]["instances"] == 32
    modalities = sorted(ds.Modality for ds in find_series(orthanc, source_study.StudyInstanceUID))
    assert modalities == ["MR", "MR", "SEG"]  # the source MR, its SEG, and the synthetic series


def test_refused_association_and_rejected_instance_are_clear_errors(orthanc, source, tmp_path):
    files = write_synthetic(tmp_path, source[3])
    with pytest.raises(PacsError, match="aborted the association before the first instance.*register 'STRANGER'"):
        exporter(orthanc, calling_ae="STRANGER").store([files])  # Orthanc accepts, then aborts on the first store
    with pytest.raises(PacsError, match="refused the association from AE 'MEDDPM'"):
        exporter(orthanc, cstore=CStoreDestination("NOT-ORTHANC", "127.0.0.1", orthanc.dicom_port)).store([files])
    broken = pydicom.dcmread(files[4])  # Orthanc refuses an instance without a Study Instance UID
    del broken.StudyInstanceUID
    broken.save_as(files[4])
    with pytest.raises(PacsError, match=r"rejected .*0005\.dcm with status 0xA700 .*; 4 instance\(s\) stored before"):
        exporter(orthanc).store([files])
    with pytest.raises(PacsError, match=r"STOW-RS to .* was refused: HTTP 400; 0 instance\(s\) stored before"):
        exporter(orthanc, cstore=None, stow_url=orthanc.dicomweb_url, credentials=(USER, PASSWORD)).store([files])


def test_dicomweb_credentials_are_used_and_never_logged(orthanc, source, tmp_path, caplog):
    files = write_synthetic(tmp_path, source[3])
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PacsError, match="HTTP 401 \\(check the DICOMweb credentials\\)"):
        exporter(orthanc, cstore=None, stow_url=orthanc.dicomweb_url, credentials=(USER, "wrong-pw-123")).store([files])
    stored = exporter(orthanc, cstore=None, stow_url=orthanc.dicomweb_url, credentials=(USER, PASSWORD)).store([files])
    assert stored["stow-rs"]["instances"] == 32
    assert PASSWORD not in caplog.text and "wrong-pw-123" not in caplog.text
    with pytest.raises(Exception, match="holds credentials"):
        exporter(orthanc, stow_url=f"http://{USER}:{PASSWORD}@127.0.0.1:{orthanc.http_port}/dicom-web")


def test_unreachable_pacs_is_retried_then_reported(tmp_path, source):
    from harness import free_port

    files = write_synthetic(tmp_path, source[3])
    closed = CStoreDestination("ORTHANC", "127.0.0.1", free_port())
    with pytest.raises(PacsError, match=r"C-STORE to ORTHANC@127.0.0.1:\d+ failed 3 time\(s\).*--pacs-retries"):
        PacsExporter(
            cstore=closed, calling_ae="MEDDPM", stow_url=None, retries=2, credentials=None, pause_s=0.01
        ).store([files])
    with pytest.raises(PacsError, match=r"STOW-RS to .* failed 2 time\(s\)"):
        PacsExporter(
            cstore=None,
            calling_ae="MEDDPM",
            stow_url=f"http://127.0.0.1:{closed.port}/dicom-web",
            retries=1,
            credentials=None,
            pause_s=0.01,
        ).store([files])


def test_dicomweb_credentials_come_from_environment_or_file(tmp_path):
    assert dicomweb_credentials({}) is None
    assert dicomweb_credentials({"MEDDPM_DICOMWEB_USER": "u", "MEDDPM_DICOMWEB_PASSWORD": "p:w"}) == ("u", "p:w")
    with pytest.raises(ConfigurationError, match="set both"):
        dicomweb_credentials({"MEDDPM_DICOMWEB_USER": "u"})
    secret = tmp_path / "secret"
    secret.write_text("reader:s3cr3t:with-colon\n")
    assert dicomweb_credentials({"MEDDPM_DICOMWEB_CREDENTIALS_FILE": str(secret)}) == ("reader", "s3cr3t:with-colon")
    secret.write_text("no-colon-here\n")
    with pytest.raises(ConfigurationError, match="not user:password") as error:
        dicomweb_credentials({"MEDDPM_DICOMWEB_CREDENTIALS_FILE": str(secret)})
    assert "no-colon-here" not in str(error.value)
