"""Sending DICOM files to a PACS: C-STORE (pynetdicom) and STOW-RS (dicomweb-client), with retries.

Transient failures (no connection, a dropped association, HTTP 408/429/5xx) are retried with a doubling
pause; a refused association or a rejected instance is not, and raises PacsError saying which and why.
DICOMweb credentials come only from the environment or a file (`dicomweb_credentials`), never from flags,
and are never logged.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from meddpm.dicom.options import CStoreDestination
from meddpm.errors import ConfigurationError, PacsError
from meddpm.retry import Backoff

log = logging.getLogger(__name__)
logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its DEBUG output dumps messages; keep data out of logs

CREDENTIAL_VARIABLES = ("MEDDPM_DICOMWEB_USER", "MEDDPM_DICOMWEB_PASSWORD", "MEDDPM_DICOMWEB_CREDENTIALS_FILE")
NETWORK_TIMEOUT_S = 30
RETRYABLE_HTTP = {408, 429, 500, 502, 503, 504}


def dicomweb_credentials(environ: Mapping[str, str] = os.environ) -> tuple[str, str] | None:
    """(user, password) from MEDDPM_DICOMWEB_USER/_PASSWORD, or a file holding `user:password` on its first
    line (MEDDPM_DICOMWEB_CREDENTIALS_FILE); None when neither is set."""
    file = environ.get("MEDDPM_DICOMWEB_CREDENTIALS_FILE")
    if file:
        try:
            line = Path(file).read_text().splitlines()[0].strip()
        except (OSError, IndexError):
            raise ConfigurationError(
                f"MEDDPM_DICOMWEB_CREDENTIALS_FILE={file}: cannot be read, or is empty; it "
                f"must hold user:password on its first line"
            ) from None
        user, colon, password = line.partition(":")
        if not (colon and user):
            raise ConfigurationError(f"MEDDPM_DICOMWEB_CREDENTIALS_FILE={file}: the first line is not user:password")
        return user, password
    user, password = environ.get("MEDDPM_DICOMWEB_USER", ""), environ.get("MEDDPM_DICOMWEB_PASSWORD", "")
    if bool(user) != bool(password):
        raise ConfigurationError("set both MEDDPM_DICOMWEB_USER and MEDDPM_DICOMWEB_PASSWORD, or neither")
    return (user, password) if user else None


class PacsExporter:
    """Stores the files of each written series at every configured destination; returns what was stored."""

    def __init__(
        self,
        *,
        cstore: CStoreDestination | None,
        calling_ae: str,
        stow_url: str | None,
        retries: int,
        credentials: tuple[str, str] | None,
        pause_s: float = 1.0,
    ):
        if stow_url:
            parts = urllib.parse.urlsplit(stow_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigurationError(
                    f"STOW-RS URL '{stow_url}' is not an http(s) URL of a DICOMweb service, "
                    f"e.g. http://pacs:8042/dicom-web"
                )
            if parts.username or parts.password:
                raise ConfigurationError(
                    f"the STOW-RS URL for {parts.hostname} holds credentials; remove them and set "
                    f"{CREDENTIAL_VARIABLES[0]}/{CREDENTIAL_VARIABLES[1]} or {CREDENTIAL_VARIABLES[2]}"
                )
        self.cstore, self.calling_ae, self.stow_url = cstore, calling_ae, stow_url
        self.retries, self.pause_s = retries, pause_s
        self._credentials = credentials

    def store(self, series: list[list[Path]]) -> dict:
        """Send every series; raises PacsError (with what was stored before it) when a destination fails."""
        report = {}
        if cstore := self.cstore:
            report["c-store"] = self._retrying(f"C-STORE to {cstore}", lambda: self._c_store(cstore, series))
        if url := self.stow_url:
            report["stow-rs"] = self._retrying(f"STOW-RS to {url}", lambda: self._stow(url, series))
        return report

    def _retrying(self, what: str, send):
        pauses = Backoff(first_s=self.pause_s, attempts=self.retries).pauses()
        for attempt in itertools.count(1):
            try:
                return send()
            except _Transient as error:
                pause = next(pauses, None)
                if pause is None:
                    raise PacsError(
                        f"{what} failed {attempt} time(s), last: {error}; check that the PACS runs "
                        f"and is reachable, or raise --pacs-retries"
                    ) from None
                log.warning("%s: %s; retrying in %.0f s (%d/%d)", what, error, pause, attempt, self.retries)
                time.sleep(pause)

    def _c_store(self, destination: CStoreDestination, series: list[list[Path]]) -> dict:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = NETWORK_TIMEOUT_S
        ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        if assoc.is_rejected:
            raise PacsError(
                f"{destination} refused the association from AE '{self.calling_ae}'; register this AE "
                f"title (--pacs-calling-ae) with the PACS, and check the called AE title"
            )
        if not assoc.is_established:
            raise _Transient(f"no association with {destination} (no answer, or aborted)")
        stored, warnings = 0, []
        try:
            for files in series:
                for path in files:
                    status = assoc.send_c_store(path)
                    if "Status" not in status and stored == 0:
                        raise _Transient(
                            f"{destination} aborted the association before the first instance was stored "
                            f"(a PACS does so for a calling AE title it does not know: register "
                            f"'{self.calling_ae}' with it, or set --pacs-calling-ae)"
                        )
                    if "Status" not in status:
                        raise _Transient(f"{destination} dropped the association after {stored} instance(s)")
                    category = code_to_category(status.Status)
                    if category == "Failure":
                        meaning = STORAGE_SERVICE_CLASS_STATUS.get(status.Status, ("", "failure"))[1]
                        raise PacsError(
                            f"{destination} rejected {path} with status 0x{status.Status:04X} ({meaning}); "
                            f"{stored} instance(s) stored before"
                        )
                    if category == "Warning":
                        warnings.append(f"{path.name}: 0x{status.Status:04X}")
                    stored += 1
        finally:
            if assoc.is_established:
                assoc.release()
        log.info("C-STORE to %s: %d instance(s) in %d series stored", destination, stored, len(series))
        return {"destination": str(destination), "series": len(series), "instances": stored, "warnings": warnings}

    def _stow(self, url: str, series: list[list[Path]]) -> dict:
        session = requests.Session()
        session.auth = self._credentials
        client = DICOMwebClient(url=url, session=session, timeout=NETWORK_TIMEOUT_S)
        client.set_http_retry_params(retry=False)  # retried here, with the same policy as C-STORE
        stored = 0
        for files in series:
            datasets = [pydicom.dcmread(path) for path in files]
            try:
                response = client.store_instances(datasets)
            except requests.HTTPError as error:
                code = error.response.status_code if error.response is not None else 0
                if code in RETRYABLE_HTTP:
                    raise _Transient(f"HTTP {code}") from None
                hint = " (check the DICOMweb credentials)" if code in (401, 403) else ""
                raise PacsError(
                    f"STOW-RS to {url} was refused: HTTP {code}{hint}; {stored} instance(s) stored before"
                ) from None
            except requests.RequestException as error:
                raise _Transient(f"{type(error).__name__}") from None
            failed = response.get("FailedSOPSequence", [])
            if failed:
                reasons = sorted({f"0x{int(item.get('FailureReason', 0)):04X}" for item in failed})
                raise PacsError(
                    f"STOW-RS to {url} rejected {len(failed)} of {len(datasets)} instance(s) "
                    f"(failure reasons {', '.join(reasons)}); {stored} instance(s) stored before"
                )
            stored += len(datasets)
        log.info("STOW-RS to %s: %d instance(s) in %d series stored", url, stored, len(series))
        return {"destination": url, "series": len(series), "instances": stored}


class _Transient(Exception):
    """A failure worth retrying."""
