"""Debian's Orthanc on free loopback ports, for the PACS demo (harness/pacs_demo.py) and the tests.

`site_configuration()` is deploy/orthanc/orthanc.json, the configuration a site runs, with this checkout's plugin
script. `LocalOrthanc(folder, config, site=...)` writes it (ports and storage in `folder` added) into a
configuration folder, the site's users and modalities in a file of their own beside it, as deploy/orthanc/README.md
tells a site to, and starts Orthanc on that folder; stop() and start() again keep its storage, as a restart of a
PACS does, and kill() is a crash.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import requests
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from harness import free_port
from meddpm.errors import ConfigurationError, PacsError

PLUGINS = Path("/usr/share/orthanc/plugins")  # Debian's orthanc-dicomweb, orthanc-python, orthanc-webviewer
SITE = Path(__file__).resolve().parents[1] / "deploy" / "orthanc"  # what a site runs: orthanc.json, the plugin
SYNTHESIS = "MeddpmSynthesis"  # the plugin's section of the configuration


def site_configuration(synthesis: dict | None = None, **overrides) -> dict:
    """deploy/orthanc/orthanc.json with this checkout's synthesis plugin, its "MeddpmSynthesis" section updated by
    `synthesis` (None: no synthesis plugin script at all), and `overrides` on top."""
    config = json.loads((SITE / "orthanc.json").read_text())
    if synthesis is None:
        del config["PythonScript"], config[SYNTHESIS]
    else:
        config["PythonScript"] = str(SITE / "synthesis_plugin.py")
        config[SYNTHESIS].update(synthesis)
    return config | overrides


class LocalOrthanc:
    def __init__(
        self,
        folder: Path,
        config: dict,
        site: dict | None = None,
        credentials: tuple[str, str] | None = None,
    ):
        """`config` as the configuration folder's orthanc.json (its plugins, with Debian's paths, in it), `site`
        (the site's users and modalities) as its site.json; `credentials` for the REST calls made here."""
        self.binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
        paths = [Path(path) for path in config.get("Plugins", [])]
        missing = [str(path) for path in paths if not path.is_file()]
        if self.binary is None or missing:
            raise ConfigurationError(
                f"Orthanc or its plugins {missing} are missing: run scripts/setup_pacs.sh (as root), which installs "
                "Debian's orthanc, orthanc-dicomweb, orthanc-python and orthanc-webviewer"
            )
        self.folder, self.credentials = folder, credentials
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log = folder / "orthanc.log"
        self.config_folder = folder / "configuration"
        settings = {
            **config,
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
        }
        self.ae_title = settings.get("DicomAet", "ORTHANC")
        self.config_folder.mkdir(parents=True, exist_ok=True)
        (self.config_folder / "orthanc.json").write_text(json.dumps(settings, indent=2))
        if site:
            (self.config_folder / "site.json").write_text(json.dumps(site, indent=2))
            (self.config_folder / "site.json").chmod(0o600)
        self.process: subprocess.Popen | None = None
        self.start()

    def __enter__(self) -> LocalOrthanc:
        return self

    def __exit__(self, *_) -> None:
        self.stop()

    def start(self, timeout_s: float = 60) -> None:
        """Start Orthanc on its configuration and storage; return once its REST API answers."""
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [self.binary, f"{self.config_folder}/"], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PacsError(f"Orthanc exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/system", auth=self.credentials, timeout=2).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise PacsError(f"Orthanc did not answer within {timeout_s:g} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Stop Orthanc as its service does (SIGTERM: plugins see it stop), killing it if it hangs."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer ends it: no plugin sees it stop."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def get(self, path: str):
        response = requests.get(f"{self.url}{path}", auth=self.credentials, timeout=10)
        response.raise_for_status()
        return response.json()

    def file(self, instance: str) -> bytes:
        response = requests.get(f"{self.url}/instances/{instance}/file", auth=self.credentials, timeout=30)
        response.raise_for_status()
        return response.content

    def series_id(self, series_uid: str) -> str:
        """Orthanc's ID of the series with this Series Instance UID."""
        response = requests.post(f"{self.url}/tools/lookup", data=series_uid, auth=self.credentials, timeout=10)
        response.raise_for_status()
        [series] = [item["ID"] for item in response.json() if item["Type"] == "Series"]
        return series

    def c_store(self, datasets: list[Dataset], calling_ae: str, called_ae: str | None = None) -> None:
        """Store `datasets` (explicit VR little endian) through the DICOM port by C-STORE, as a modality or a
        segmentation tool sends them (calling this Orthanc by its AE title, or by `called_ae`)."""
        ae = AE(ae_title=calling_ae)
        for sop_class in sorted({ds.SOPClassUID for ds in datasets}):
            ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
        association = ae.associate("127.0.0.1", self.dicom_port, ae_title=called_ae or self.ae_title)
        if not association.is_established:
            raise PacsError(f"Orthanc at port {self.dicom_port} refused the association from {calling_ae!r}")
        try:
            # no status: Orthanc aborted the association (it does so for a calling AE title it does not know)
            statuses = [association.send_c_store(ds).get("Status") for ds in datasets]
        finally:
            if association.is_established:
                association.release()
        refused = [status for status in statuses if status != 0]
        if refused:
            why = "association aborted" if refused[0] is None else f"status {refused[0]:#06x}"
            raise PacsError(f"Orthanc refused {len(refused)} of {len(datasets)} instances ({why})")
