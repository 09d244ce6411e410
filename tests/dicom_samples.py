"""DICOM test inputs made on the fly: a phantom MR series with patient data, its SEG, label-map series."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pydicom
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.misc import is_dicom

from meddpm.dicom import phantom_study
from meddpm.dicom.phantom_study import image_series, oblique_affine

# Identifying attributes of the made-up source patient: none of these values may reach an output or a log.
PATIENT = {
    "PatientName": "Doe^Jane",
    "PatientID": "PAT-0042-XYZ",
    "PatientBirthDate": "19700101",
    "PatientSex": "F",
    "PatientAge": "056Y",
    "AccessionNumber": "ACC-99881",
    "InstitutionName": "Saint Example Hospital",
    "ReferringPhysicianName": "House^Gregory",
    "StudyID": "STUDY-7731",
    "StudyDescription": "Brain tumour follow-up Doe",
    "StudyDate": "20240315",
    "StudyTime": "101500.25",
}
PIXEL_DATA = 0x7FE00010


def study(identity: dict[str, str] = PATIENT) -> Dataset:
    """Patient and study attributes of one made-up study, by default of the patient whose data must not leak."""
    return phantom_study.study(identity)


def identifying_values() -> list[str]:
    """The source patient's values long enough to search for (PatientSex 'F' is checked by attribute)."""
    return [v for v in PATIENT.values() if len(v) > 1] + [v.split("^")[0] for v in PATIENT.values() if "^" in v]


def leaked_values(content: Dataset | Path | str) -> list[str]:
    """The identifying values found in a dataset, a file (gunzipped) or a text. Of DICOM only the element values
    are searched, not the pixels or UIDs: random bytes and digit runs hold a short number, such as a date, by chance."""
    if isinstance(content, Path):
        if is_dicom(content):
            content = dcmread(content)
        else:
            data = content.read_bytes()
            content = (gzip.decompress(data) if content.suffix == ".gz" else data).decode("latin-1")
    if isinstance(content, Dataset):
        elements = [*content.iterall(), *(content.file_meta.iterall() if hasattr(content, "file_meta") else ())]
        values = [e.value for e in elements if e.tag != PIXEL_DATA and e.VR not in ("UI", "SQ")]
        content = "\n".join(v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in values)
    return [value for value in identifying_values() if value in content]


def save(datasets: list[Dataset], folder: Path, prefix: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(datasets):
        path = folder / f"{prefix}_{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def label_map_series(folder, series_number: bytes, uid_seed: int):
    """A small label-map series whose Series Number holds `series_number` as stored, valid or not."""
    labels = np.zeros((8, 8, 4), np.uint16)
    labels[2:6, 2:6, 1:3] = 1
    series = image_series(labels, oblique_affine(labels.shape, 6.0), study(), 3 + uid_seed, "labels")
    for ds in series:
        ds[0x00200011] = RawDataElement(pydicom.tag.Tag(0x00200011), "IS", len(series_number), series_number, 0, 1, 1)
    return save(series, folder, "slice")
