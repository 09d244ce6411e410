"""Sending DICOM files to a PACS: C-STORE (pynetdicom) and STOW-RS (dicomweb-client), with retries.

Transient failures (no connection, a dropped association, HTTP 408/429/5xx, a PACS silent for `timeout_s`) are
retried with a pause that doubles up to PACS_MAX_PAUSE_S; a refused association or a rejected instance is not,
and raises PacsError saying which and why. Each try runs in a thread of its own that is abandoned (its connection
closed) at the deadline or on a stop (Ctrl-C, SIGTERM): one mask's transfer to one destination, tries and pauses
included, ends within `deadline_s` even when a server trickles its answer. A STOW-RS answer counts only when it
lists every instance sent as stored. DICOMweb credentials come only from the environment or a file
(`dicomweb_credentials`), never from flags, and are never logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from meddpm.dicom.options import PACS_DEADLINE_S, PACS_MAX_PAUSE_S, PACS_TIMEOUT_S, CStoreDestination, check_stow_url
from meddpm.errors import ConfigurationError, Interrupted, PacsError
from meddpm.retry import Backoff, wait

log = logging.getLogger(__name__)
logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its DEBUG output dumps messages; keep data out of logs

CREDENTIAL_VARIABLES = ("MEDDPM_DICOMWEB_USER", "MEDDPM_DICOMWEB_PASSWORD", "MEDDPM_DICOMWEB_CREDENTIALS_FILE")
CREDENTIALS_FILE_BYTES = 4096
RETRYABLE_HTTP = {408, 429, 500, 502, 503, 504}
POLL_S = 0.1  # how often the wait for a try looks at the deadline and the stop
T = TypeVar("T")


def dicomweb_credentials(environ: Mapping[str, str] = os.environ) -> tuple[str, str] | None:
    """(user, password) from MEDDPM_DICOMWEB_USER/_PASSWORD, or a file holding `user:password` on its first
    line (MEDDPM_DICOMWEB_CREDENTIALS_FILE); None when neither is set."""
    file = environ.get("MEDDPM_DICOMWEB_CREDENTIALS_FILE")
    if file:
        user, colon, password = _first_line(file).partition(":")
        if not (colon and user):
            raise ConfigurationError(f"MEDDPM_DICOMWEB_CREDENTIALS_FILE={file}: the first line is not user:password")
        return user, password
    user, password = environ.get("MEDDPM_DICOMWEB_USER", ""), environ.get("MEDDPM_DICOMWEB_PASSWORD", "")
    if bool(user) != bool(password):
        raise ConfigurationError("set both MEDDPM_DICOMWEB_USER and MEDDPM_DICOMWEB_PASSWORD, or neither")
    return (user, password) if user else None


def _first_line(file: str) -> str:
    """The first line of a credentials file: a regular file of at most CREDENTIALS_FILE_BYTES, in UTF-8."""
    what = f"MEDDPM_DICOMWEB_CREDENTIALS_FILE={file}"
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)  # a plain open of a FIFO waits for a writer
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigurationError(f"{what}: not a regular file; name a file holding user:password")
            with open(fd, "rb", closefd=False) as stream:
                data = stream.read(CREDENTIALS_FILE_BYTES + 1)
        finally:
            os.close(fd)
    except OSError as error:
        raise ConfigurationError(f"{what}: cannot be read ({error.strerror}); check the path") from None
    if len(data) > CREDENTIALS_FILE_BYTES:
        raise ConfigurationError(f"{what}: over {CREDENTIALS_FILE_BYTES} bytes; it must hold user:password")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigurationError(f"{what}: not UTF-8 text; save it as UTF-8") from None
    if not lines:
        raise ConfigurationError(f"{what}: empty; it must hold user:password on its first line")
    return lines[0].strip()


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
        timeout_s: float = PACS_TIMEOUT_S,
        deadline_s: float = PACS_DEADLINE_S,
    ):
        """`timeout_s`: how long a PACS may stay silent before a try fails; `deadline_s`: how long one `store`
        may take at one destination, tries and pauses included."""
        if stow_url:
            try:
                check_stow_url(stow_url)
            except ValueError as error:
                raise ConfigurationError(f"STOW-RS URL: {error}") from None
            parts = urllib.parse.urlsplit(stow_url)
            if parts.username or parts.password:
                raise ConfigurationError(
                    f"the STOW-RS URL for {parts.hostname} holds credentials; remove them and set "
                    f"{CREDENTIAL_VARIABLES[0]}/{CREDENTIAL_VARIABLES[1]} or {CREDENTIAL_VARIABLES[2]}"
                )
        self.cstore, self.calling_ae, self.stow_url = cstore, calling_ae, stow_url
        self.retries, self.timeout_s, self.deadline_s = retries, timeout_s, deadline_s
        self.backoff = Backoff(first_s=pause_s, max_s=PACS_MAX_PAUSE_S, attempts=retries)
        self._credentials = credentials

    def store(self, series: list[list[Path]], stop: threading.Event | None = None) -> dict:
        """Send every series; raises PacsError (with what was stored before it) when a destination fails, and
        Interrupted as soon as `stop` is set."""
        report = {}
        if cstore := self.cstore:
            report["c-store"] = self._retrying(
                f"C-STORE to {cstore}", lambda attempt: self._c_store(cstore, series, attempt), stop
            )
        if url := self.stow_url:
            report["stow-rs"] = self._retrying(
                f"STOW-RS to {url}", lambda attempt: self._stow(url, series, attempt), stop
            )
        return report

    def _retrying(self, what: str, send: Callable[[_Try], dict], stop: threading.Event | None) -> dict:
        deadline = time.monotonic() + self.deadline_s
        pauses, attempt = self.backoff.pauses(), 0
        while True:
            attempt += 1
            try:
                return _Try().run(send, deadline, stop, what)
            except _DeadlinePassed:
                raise PacsError(
                    f"{what} did not finish within {self.deadline_s:g} s (try {attempt}); check the PACS, "
                    f"or raise --pacs-deadline"
                ) from None
            except _Transient as error:
                pause = next(pauses, None)
                if pause is None or time.monotonic() + pause >= deadline:
                    limit = "--pacs-retries" if pause is None else "--pacs-deadline"
                    raise PacsError(
                        f"{what} failed {attempt} time(s), last: {error}; {limit} allows no further try: check that "
                        f"the PACS runs and is reachable, or raise {limit}"
                    ) from None
                log.warning("%s: %s; retrying in %.0f s (%d/%d)", what, error, pause, attempt, self.retries)
                wait(pause, stop, f"waiting to retry {what}")

    def _c_store(self, destination: CStoreDestination, series: list[list[Path]], attempt: _Try) -> dict:
        ae = AE(ae_title=self.calling_ae)
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        attempt.hold(assoc.abort)
        if assoc.is_rejected:
            raise PacsError(
                f"{destination} refused the association from AE '{self.calling_ae}'; register this AE "
                f"title (--pacs-calling-ae) with the PACS, and check the called AE title"
            )
        if not assoc.is_established:
            raise _Transient(
                f"no association with {destination} (refused, aborted, or no answer within {self.timeout_s:g} s)"
            )
        stored, warnings = 0, []
        try:
            for files in series:
                for path in files:
                    attempt.check()
                    status = assoc.send_c_store(path)
                    if "Status" not in status and stored == 0:
                        raise _Transient(
                            f"{destination} aborted the association before the first instance was stored "
                            f"(a PACS does so for a calling AE title it does not know: register "
                            f"'{self.calling_ae}' with it, or set --pacs-calling-ae)"
                        )
                    if "Status" not in status:
                        raise _Transient(
                            f"{destination} dropped the association, or did not answer within "
                            f"{self.timeout_s:g} s, after {stored} instance(s)"
                        )
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

    def _stow(self, url: str, series: list[list[Path]], attempt: _Try) -> dict:
        session = requests.Session()
        session.auth = self._credentials
        attempt.hold(session.close)
        client = DICOMwebClient(url=url, session=session, timeout=self.timeout_s)
        client.set_http_retry_params(retry=False)  # retried here, with the same policy as C-STORE
        stored = 0
        for files in series:
            attempt.check()
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
            except (requests.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise PacsError(
                    f"STOW-RS to {url}: the server's answer is not a DICOM JSON dataset; {stored} instance(s) "
                    f"stored before; check that the URL is the PACS's DICOMweb root"
                ) from None
            except requests.RequestException as error:
                raise _Transient(f"{type(error).__name__}") from None
            _check_answer(url, response, datasets, stored)
            stored += len(datasets)
        log.info("STOW-RS to %s: %d instance(s) in %d series stored", url, stored, len(series))
        return {"destination": url, "series": len(series), "instances": stored}


def _check_answer(url: str, answer: pydicom.Dataset, sent: Sequence[pydicom.Dataset], stored_before: int) -> None:
    """A STOW-RS answer must list each instance sent as stored (ReferencedSOPSequence) and none as failed."""
    failed = answer.get("FailedSOPSequence", [])
    if failed:
        reasons = sorted({f"0x{int(item.get('FailureReason', 0)):04X}" for item in failed})
        raise PacsError(
            f"STOW-RS to {url} rejected {len(failed)} of {len(sent)} instance(s) "
            f"(failure reasons {', '.join(reasons)}); {stored_before} instance(s) stored before"
        )
    uids = {ds.SOPInstanceUID for ds in sent}
    listed = uids & {item.get("ReferencedSOPInstanceUID") for item in answer.get("ReferencedSOPSequence", [])}
    if listed != uids:
        how_many = f"only {len(listed)} of the {len(uids)} instances sent as stored" if listed else "no stored instance"
        raise PacsError(
            f"STOW-RS to {url}: the server's answer listed {how_many}; {stored_before} instance(s) "
            f"stored before; check that the URL is the PACS's DICOMweb root, and the PACS's log"
        )


class _Try:
    """One try at a transfer, run in a thread of its own so that the caller can abandon it: at the deadline, or
    when `stop` is set. The try registers what to close then (`hold`) and looks whether it was (`check`)."""

    def __init__(self) -> None:
        self._abandoned = threading.Event()
        self._closers: list[Callable[[], object]] = []

    def run(self, send: Callable[[_Try], T], deadline: float, stop: threading.Event | None, what: str) -> T:
        outcome: list = []

        def work() -> None:
            try:
                outcome.append((send(self), None))
            except Exception as error:
                outcome.append((None, error))

        worker = threading.Thread(target=work, name="pacs-transfer", daemon=True)  # never holds up the exit
        worker.start()
        while worker.is_alive():
            if (stop is not None and stop.is_set()) or time.monotonic() >= deadline:
                self._abandon()
                if stop is not None and stop.is_set():
                    raise Interrupted(f"stopped by Ctrl-C or SIGTERM during {what}")
                raise _DeadlinePassed
            worker.join(POLL_S)
        [(result, error)] = outcome
        if error is not None:
            raise error
        return result

    def hold(self, close: Callable[[], object]) -> None:
        self._closers.append(close)
        if self._abandoned.is_set():
            close()
        self.check()

    def check(self) -> None:
        if self._abandoned.is_set():
            raise _Transient("abandoned")  # nobody waits for this try any more

    def _abandon(self) -> None:
        self._abandoned.set()
        for close in self._closers:
            with contextlib.suppress(Exception):
                close()


class _Transient(Exception):
    """A failure worth retrying."""


class _DeadlinePassed(Exception):
    """The transfer's deadline passed during a try."""
