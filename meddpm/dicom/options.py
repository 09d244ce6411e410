"""DICOM and PACS settings, parsed without loading the DICOM libraries (the app's settings table reads them)."""

from __future__ import annotations

import dataclasses
from enum import StrEnum

from meddpm.errors import ConfigurationError
from meddpm.model.presets import Preset


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


@dataclasses.dataclass(frozen=True)
class CStoreDestination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> CStoreDestination:
        """AE@HOST:PORT, e.g. ORTHANC@pacs.example.org:4242."""
        ae_title, at, address = text.rpartition("@")
        host, colon, port = address.rpartition(":")
        if not (at and colon and ae_title and host and port.isdigit()) or len(ae_title) > 16:
            raise ValueError(f"'{text}' is not AE@HOST:PORT (AE title at most 16 characters), e.g. ORTHANC@pacs:4242")
        return cls(ae_title, host, int(port))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"
