"""Every PACS transfer ends: against real local peers that trickle, answer nothing, answer `{}` or refuse, a
transfer ends by its deadline, a silent peer by the timeout, a retry pause by a stop; and what cannot work is
refused as a setting (AE titles, ports, URLs, the Triton address, endless windows, the credentials file)."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import re
import socket
import threading
import time

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from app.settings import parse_settings
from meddpm.backends.triton_client.options import server_address
from meddpm.dicom.options import PACS_MAX_PAUSE_S, CStoreDestination, ae_title, check_stow_url
from meddpm.dicom.pacs import PacsExporter, dicomweb_credentials
from meddpm.errors import ConfigurationError, Interrupted, PacsError
from meddpm.retry import wait

SLACK_S = 10  # the machine is busy: bounds are generous, the point is "seconds, not minutes"


def instances(folder, count=2):
    """`count` small MR instances written as files."""
    paths = []
    for index in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.4", "MR"
        paths.append(folder / f"{index}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def stow_answer(uids):
    """A STOW-RS answer listing `uids` as stored (ReferencedSOPSequence / ReferencedSOPInstanceUID)."""
    items = [{"00081155": {"vr": "UI", "Value": [uid]}} for uid in uids]
    return json.dumps({"00081199": {"vr": "SQ", "Value": items}}).encode()


class Peer(http.server.ThreadingHTTPServer):
    """A DICOMweb server on 127.0.0.1 whose answer to a POST is `answer(uids of the instances posted)`, sent in one
    piece or, with `trickle_s`, one byte every `trickle_s` seconds (until closed)."""

    daemon_threads = True

    def __init__(self, answer, trickle_s=None):
        self.answer, self.trickle_s, self.closing = answer, trickle_s, threading.Event()
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"

    def close(self):
        self.closing.set()
        self.shutdown()
        self.server_close()


class Handler(http.server.BaseHTTPRequestHandler):
    server: Peer

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        boundary = re.search(r'boundary="?([^";]+)', self.headers["Content-Type"])[1].encode()
        parts = [part.partition(b"\r\n\r\n")[2][:-2] for part in body.split(b"--" + boundary)[1:-1]]
        uids = [pydicom.dcmread(io.BytesIO(part)).SOPInstanceUID for part in parts]
        answer = self.server.answer(uids)
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nContent-Length: {len(answer)}\r\n\r\n"
        if self.server.trickle_s is None:
            self.wfile.write(head.encode() + answer)
            return
        for byte in head.encode() + answer:
            if self.server.closing.wait(self.server.trickle_s):
                return
            self.wfile.write(bytes([byte]))
            self.wfile.flush()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def peer(answer, trickle_s=None):
    server = Peer(answer, trickle_s)
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def silent_dicom_peer():
    """A TCP port that accepts connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield CStoreDestination("SILENT", "127.0.0.1", listener.getsockname()[1])


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def exporter(**settings):
    defaults = {"cstore": None, "calling_ae": "MEDDPM", "stow_url": None, "retries": 0, "credentials": None}
    return PacsExporter(**{**defaults, "pause_s": 0.01, **settings})


@contextlib.contextmanager
def within(seconds):
    """The block ends within `seconds` (by an exception, when it is one that `pytest.raises` expects inside)."""
    started = time.monotonic()
    yield
    assert time.monotonic() - started < seconds


def test_a_stow_rs_answer_counts_only_when_it_lists_every_instance_sent(tmp_path):
    files = instances(tmp_path)
    with peer(stow_answer) as good:
        assert exporter(stow_url=good.url).store([files])["stow-rs"]["instances"] == 2
    with peer(lambda uids: b"{}") as empty, pytest.raises(PacsError, match="listed no stored instance"):
        exporter(stow_url=empty.url).store([files])
    with peer(lambda uids: stow_answer(uids[:1])) as partial, pytest.raises(PacsError, match="only 1 of the 2"):
        exporter(stow_url=partial.url).store([files])
    with peer(lambda uids: b"<html>") as garbage, pytest.raises(PacsError, match="not a DICOM JSON dataset"):
        exporter(stow_url=garbage.url).store([files])


def test_a_trickling_stow_rs_server_is_left_at_the_deadline(tmp_path):
    """One byte a second never trips a read timeout of 2 s; the 3 s deadline of the whole transfer ends it."""
    files = instances(tmp_path)
    with peer(stow_answer, trickle_s=1.0) as slow, within(3 + SLACK_S):
        with pytest.raises(PacsError, match=r"did not finish within 3 s .*--pacs-deadline"):
            exporter(stow_url=slow.url, retries=3, timeout_s=2, deadline_s=3).store([files])


def test_a_silent_c_store_peer_fails_each_try_after_the_timeout(tmp_path):
    files = instances(tmp_path)
    with silent_dicom_peer() as silent, within(2 + SLACK_S):
        with pytest.raises(PacsError, match=r"failed 2 time\(s\).*no answer within 1 s"):
            exporter(cstore=silent, retries=1, timeout_s=1).store([files])


def test_retry_pauses_are_capped_and_the_deadline_ends_the_retries(tmp_path):
    unreachable = CStoreDestination("ORTHANC", "127.0.0.1", closed_port())
    pauses = list(exporter(cstore=unreachable, retries=40, pause_s=1.0).backoff.pauses())
    assert len(pauses) == 40 and pauses[:3] == [1.0, 2.0, 4.0] and max(pauses) == PACS_MAX_PAUSE_S
    with within(3 + SLACK_S), pytest.raises(PacsError, match=r"--pacs-deadline allows no further try"):
        exporter(cstore=unreachable, retries=40, pause_s=1.0, deadline_s=3).store([instances(tmp_path)])


def test_a_stop_ends_a_retry_pause_and_a_try_at_once(tmp_path):
    files = instances(tmp_path)
    unreachable = CStoreDestination("ORTHANC", "127.0.0.1", closed_port())
    with within(SLACK_S), pytest.raises(Interrupted, match="while waiting to retry C-STORE"):
        exporter(cstore=unreachable, retries=5, pause_s=60.0).store([files], stop=stopped_soon())
    with peer(stow_answer, trickle_s=1.0) as slow, within(SLACK_S):
        with pytest.raises(Interrupted, match="during STOW-RS"):
            exporter(stow_url=slow.url).store([files], stop=stopped_soon())
    with within(SLACK_S), pytest.raises(Interrupted, match="while waiting for the PACS"):
        wait(600, stopped_soon(), "waiting for the PACS")


def stopped_soon():
    """An event set half a second from now, from another thread (as the app's signal handler does)."""
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    return stop


@pytest.mark.parametrize("title", ["A\nB", "MEDDPM\r", "ABCDEFGHIJKLMNOPQ", "A\\B", "    ", "", "ÄRZTE", "A\x00"])
def test_what_is_not_an_ae_title_is_refused(title):
    with pytest.raises(ValueError, match="is not an AE title"):
        ae_title(title)
    with pytest.raises(ValueError, match="is not an AE title"):
        CStoreDestination.parse(f"{title}@pacs:4242")
    with pytest.raises(ConfigurationError, match="MEDDPM_PACS_CALLING_AE=.*is not an AE title"):
        parse_settings([], {"MEDDPM_PACS_CALLING_AE": title})
    assert ae_title("ORTHANC 1-@_.") == "ORTHANC 1-@_."


@pytest.mark.parametrize("text", ["X@127.0.0.1:99999", "X@127.0.0.1:0", "X@pacs:", "X@pac s:104", "X@pacs:٤٢"])
def test_a_c_store_address_needs_a_host_and_a_port_from_1_to_65535(text):
    with pytest.raises(ValueError, match="is not AE@HOST:PORT with a port from 1 to 65535"):
        CStoreDestination.parse(text)
    assert CStoreDestination.parse("ORTHANC@::1:65535") == CStoreDestination("ORTHANC", "::1", 65535)


@pytest.mark.parametrize(
    "url", ["http://[::1/dicom-web", "http://pacs:99999/dicom-web", "ftp://pacs/dicom-web", "http:///x", "pacs:8042"]
)
def test_a_malformed_stow_url_is_a_configuration_error(url):
    with pytest.raises(ValueError, match="http"):
        check_stow_url(url)
    with pytest.raises(ConfigurationError, match="STOW-RS URL: not"):
        exporter(stow_url=url)
    assert check_stow_url("https://[::1]:8042/dicom-web") == "https://[::1]:8042/dicom-web"


@pytest.mark.parametrize("text", ["inf", "nan", "-1", "0", "1e300"])
def test_seconds_are_finite_and_bounded(text):
    with pytest.raises(ConfigurationError, match=f"MEDDPM_TRITON_RETRY_WINDOW='{text}': .* at most 86400"):
        parse_settings([], {"MEDDPM_TRITON_RETRY_WINDOW": text})
    settings, _ = parse_settings(["--pacs-timeout", "5", "--pacs-deadline", "60"], {})
    assert (settings.pacs_timeout, settings.pacs_deadline) == (5.0, 60.0)


@pytest.mark.parametrize("netloc", ["not a netloc", "triton", "triton:0", "triton:99999", "triton:8001/v2", "u@h:1"])
def test_a_triton_address_is_host_and_port(netloc):
    with pytest.raises(ConfigurationError, match="TRITON_SERVER_NETLOC.* is not HOST:PORT"):
        server_address(netloc)
    assert server_address("triton-1.local:8001") == "triton-1.local:8001"
    assert server_address("[::1]:8001") == "[::1]:8001"


def test_the_credentials_file_is_a_small_regular_utf8_file(tmp_path):
    file = tmp_path / "credentials"
    environ = {"MEDDPM_DICOMWEB_CREDENTIALS_FILE": str(file)}
    file.write_text("réader:pässword\n", encoding="utf-8")
    assert dicomweb_credentials(environ) == ("réader", "pässword")
    file.write_text("réader:pässword\n", encoding="latin-1")
    with pytest.raises(ConfigurationError, match="not UTF-8 text"):
        dicomweb_credentials(environ)
    file.write_text("reader:" + "x" * 5000)
    with pytest.raises(ConfigurationError, match="over 4096 bytes"):
        dicomweb_credentials(environ)
    file.write_text("")
    with pytest.raises(ConfigurationError, match="empty"):
        dicomweb_credentials(environ)
    with pytest.raises(ConfigurationError, match="not a regular file"):
        dicomweb_credentials({"MEDDPM_DICOMWEB_CREDENTIALS_FILE": str(tmp_path)})


def test_a_fifo_as_credentials_file_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused = []

    def read():
        try:
            dicomweb_credentials({"MEDDPM_DICOMWEB_CREDENTIALS_FILE": str(fifo)})
        except ConfigurationError as error:
            refused.append(str(error))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(SLACK_S)
    if reader.is_alive():  # let a blocked open go, so that the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert refused and "not a regular file" in refused[0]
