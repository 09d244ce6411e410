"""DICOM and PACS settings, parsed without loading the DICOM libraries (the app's settings table reads them)."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import urllib.parse
from enum import StrEnum

from meddpm.errors import ConfigurationError
from meddpm.model.presets import Preset

PACS_TIMEOUT_S = 30.0  # a PACS silent this long (connecting, answering the association, an instance, a read)
PACS_DEADLINE_S = 300.0  # one mask's series to one PACS: all tries and the pauses between them
PACS_MAX_PAUSE_S = 30.0  # the retry pauses double from 1 s up to this
HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?")


class IdentityPolicy(StrEnum):
    """Whose patient and study a DICOM output is filed under (meddpm.dicom.writer)."""

    PSEUDONYMOUS = "pseudonymous"  # a new patient and study for every mask, nothing copied from the input
    KEEP_STUDY = "keep-study"  # the source study: its Study Instance UID, Frame of Reference, KEEP_STUDY_ATTRIBUTES


KEEP_STUDY_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "FrameOfReferenceUID",
)
COPYABLE_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "StudyDescription",
    "AccessionNumber",
    "ReferringPhysicianName",
    "InstitutionName",
)


@dataclasses.dataclass(frozen=True)
class DicomOptions:
    identity: IdentityPolicy = IdentityPolicy.PSEUDONYMOUS
    copy: tuple[str, ...] = ()  # from COPYABLE_ATTRIBUTES
    uid_seed: str | None = None  # UIDs and pseudonym derived from it (a re-run writes the same ones); None: random


@dataclasses.dataclass(frozen=True)
class SegmentMap:
    """SEG segments -> preset labels: entries (segment number or lower-case segment label, label value)."""

    entries: tuple[tuple[int | str, int], ...]

    @classmethod
    def parse(cls, text: str) -> SegmentMap:
        entries = []
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.rpartition("=")
            if not sep or not key.strip() or not value.strip().isdigit():
                raise ValueError(f"'{item}' is not SEGMENT=LABEL (e.g. 'Brain=1,Tumour=2' or '3=1')")
            key = key.strip()
            entries.append((int(key) if key.isdigit() else key.lower(), int(value)))
        if not entries:
            raise ValueError("empty segment map; give SEGMENT=LABEL pairs, e.g. 'Brain=1,Tumour=2'")
        return cls(tuple(entries))

    def check(self, preset: Preset) -> None:
        unknown = sorted({label for _, label in self.entries} - set(preset.condition.labels))
        if unknown:
            raise ConfigurationError(
                f"segment map labels {unknown} are not labels of preset '{preset.name}', which "
                f"accepts {list(preset.condition.labels)}"
            )


def is_host(text: str) -> bool:
    """A host name or an IP address."""
    try:
        return bool(HOST_NAME.fullmatch(text) or ipaddress.ip_address(text))
    except ValueError:
        return False


def ae_title(text: str) -> str:
    """An AE title as DICOM PS3.5 defines it: 1 to 16 ASCII characters, no control character and no backslash,
    not all spaces."""
    if not (0 < len(text) <= 16 and text.strip(" ") and all(" " <= c <= "~" and c != "\\" for c in text)):
        raise ValueError(
            f"{text!a} is not an AE title: 1 to 16 ASCII letters, digits, spaces or punctuation, "
            f"no backslash, not all spaces (e.g. MEDDPM)"
        )
    return text


def check_stow_url(text: str) -> str:
    """A DICOMweb base URL, http(s)://HOST[:PORT][/PATH]; the URL is not repeated in the error (it may hold a
    password)."""
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as error:
        raise ValueError(
            f"not a URL ({error}); give http(s)://HOST[:PORT]/PATH, e.g. http://pacs:8042/dicom-web"
        ) from None
    if parts.scheme not in ("http", "https") or not is_host(parts.hostname or "") or port == 0:
        raise ValueError(
            "not an http(s) URL of a DICOMweb service; give http(s)://HOST[:PORT]/PATH with a port from 1 to "
            "65535, e.g. http://pacs:8042/dicom-web"
        )
    return text


@dataclasses.dataclass(frozen=True)
class CStoreDestination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> CStoreDestination:
        """AE@HOST:PORT, e.g. ORTHANC@pacs.example.org:4242."""
        called, at, address = text.rpartition("@")
        host, colon, port = address.rpartition(":")
        if not (at and colon and is_host(host) and port.isascii() and port.isdigit() and 0 < int(port) < 2**16):
            raise ValueError(f"{text!a} is not AE@HOST:PORT with a port from 1 to 65535, e.g. ORTHANC@pacs:4242")
        return cls(ae_title(called), host, int(port))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"
