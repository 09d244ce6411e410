"""A real Orthanc PACS (Debian's `orthanc` and `orthanc-dicomweb`) on free loopback ports, for the tests.

DIMSE and DICOMweb are on; DICOMweb needs a user and password; stores are accepted only from the AE titles
registered as modalities.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AE_TITLE = "ORTHANC"
USER, PASSWORD = "meddpm", "pw-7f3a9c"  # a test server's; never a real credential
MODALITIES = {"meddpm": "MEDDPM", "tests": "TESTSCU"}


def c_store(server: OrthancServer, datasets: list[Dataset]) -> None:
    """Store `datasets` into Orthanc's DICOM port by C-STORE, as a modality or a segmentation tool does."""
    ae = AE(ae_title=MODALITIES["tests"])
    for sop_class in sorted({ds.SOPClassUID for ds in datasets}):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)  # the test data's transfer syntax
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=AE_TITLE)
    assert assoc.is_established
    statuses = [assoc.send_c_store(ds).Status for ds in datasets]
    assoc.release()
    assert statuses == [0] * len(datasets)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OrthancServer:
    """`extra` adds to (or overrides) the configuration, `plugins` adds plugin libraries to DICOMweb's."""

    def __init__(self, folder: Path, extra: dict | None = None, plugins: tuple[Path, ...] = ()):
        binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
        missing = [str(p) for p in (DICOMWEB_PLUGIN, *plugins) if not p.is_file()]
        if binary is None or missing:
            pytest.fail(f"Orthanc or its plugins {missing} are missing: run scripts/setup_pacs.sh (as root)")
        self.binary, self.folder = binary, folder
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        config = {
            "Name": "meddpm-tests",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": AE_TITLE,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": False,
            "DicomModalities": {name: [ae, "127.0.0.1", free_port()] for name, ae in MODALITIES.items()},
            "Plugins": [str(DICOMWEB_PLUGIN), *map(str, plugins)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1,
            "SaveJobs": False,
            **(extra or {}),
        }
        (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log = folder / "orthanc.log"
        self.start()

    def start(self) -> None:
        """Start Orthanc on its configuration and storage (again, after stop())."""
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [self.binary, str(self.folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"Orthanc exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/system", auth=(USER, PASSWORD), timeout=2).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"Orthanc did not answer within {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def get(self, path: str):
        response = requests.get(f"{self.url}{path}", auth=(USER, PASSWORD), timeout=10)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
