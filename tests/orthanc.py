"""The tests' Orthanc: the site configuration (deploy/orthanc/orthanc.json) as shipped, with only what a test must
override: ports and storage, this checkout's plugin script and synthesis settings, a short StableAge; and, as a
site keeps them, its users and modalities in a site file of their own."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset

from harness import free_port
from harness.local_orthanc import LocalOrthanc, site_configuration

AE_TITLE = "ORTHANC"
USER, PASSWORD = "meddpm", "pw-7f3a9c"  # a test server's; never a real credential
MODALITIES = {"meddpm": "MEDDPM", "tests": "TESTSCU"}


class OrthancServer(LocalOrthanc):
    """`synthesis` runs the synthesis plugin with these settings (None: no plugin script); `extra` overrides the
    configuration (e.g. StableAge)."""

    def __init__(self, folder: Path, extra: dict | None = None, synthesis: dict | None = None):
        config = site_configuration(synthesis, **{"StableAge": 1, "SaveJobs": False, **(extra or {})})
        site = {
            "RegisteredUsers": {USER: PASSWORD},
            "DicomModalities": {name: [ae, "127.0.0.1", free_port()] for name, ae in MODALITIES.items()},
        }
        super().__init__(folder, config, site, credentials=(USER, PASSWORD))
        self.dicomweb_url = f"{self.url}/dicom-web"


def c_store(server: OrthancServer, datasets: list[Dataset]) -> None:
    """C-STORE from the tests' registered AE title."""
    server.c_store(datasets, MODALITIES["tests"])
