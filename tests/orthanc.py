"""The tests' Orthanc: harness/local_orthanc.py with DIMSE and DICOMweb on, a user and password for the REST
and DICOMweb APIs, and stores accepted only from the AE titles registered as modalities."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset

from harness import free_port
from harness.local_orthanc import LocalOrthanc

AE_TITLE = "ORTHANC"
USER, PASSWORD = "meddpm", "pw-7f3a9c"  # a test server's; never a real credential
MODALITIES = {"meddpm": "MEDDPM", "tests": "TESTSCU"}


class OrthancServer(LocalOrthanc):
    """`extra` adds to (or overrides) the configuration, `plugins` (file names) adds to the DICOMweb plugin."""

    def __init__(self, folder: Path, extra: dict | None = None, plugins: tuple[str, ...] = ()):
        config = {
            "Name": "meddpm-tests",
            "DicomAet": AE_TITLE,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": False,
            "DicomModalities": {name: [ae, "127.0.0.1", free_port()] for name, ae in MODALITIES.items()},
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1,
            "SaveJobs": False,
            **(extra or {}),
        }
        super().__init__(folder, config, ("libOrthancDicomWeb.so", *plugins), credentials=(USER, PASSWORD))
        self.dicomweb_url = f"{self.url}/dicom-web"


def c_store(server: OrthancServer, datasets: list[Dataset]) -> None:
    """C-STORE from the tests' registered AE title."""
    server.c_store(datasets, MODALITIES["tests"])
