"""Phantom DICOM studies: an "acquired" MR series of a phantom head with a made-up patient, and its DICOM SEG, as a
scanner and a segmentation tool would send them to a PACS. For the PACS demo (harness/pacs_demo.py) and the tests;
nothing here is real patient data."""

from __future__ import annotations

import datetime

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from meddpm.imaging.geometry import LPS_TO_RAS
from meddpm.imaging.phantom_heads import make_phantom

# A made-up patient: enough identity for a PACS to file the study, and for the identity policy to show what it does.
PHANTOM_PATIENT = {
    "PatientName": "Phantom^Demo",
    "PatientID": "PHANTOM-0001",
    "PatientBirthDate": "19800101",
    "PatientSex": "O",
    "StudyDescription": "Phantom head for Med-DDPM synthesis",
    "StudyDate": "20260101",
    "StudyTime": "120000",
    "StudyID": "PH1",
    "AccessionNumber": "PH-0001",
    "ReferringPhysicianName": "",
}
SEGMENTS = {1: "Brain", 2: "Tumour"}


def phantom_study(seed: int, identity: dict[str, str] = PHANTOM_PATIENT) -> tuple[list[Dataset], Dataset]:
    """A 32^3 phantom head on an oblique 6 mm grid: its MR series (T1-like, 400 per label) and its SEG."""
    labels, _ = make_phantom(np.random.default_rng(seed), (32, 32, 32), 6.0)
    mr = image_series(labels.astype(np.uint16) * 400, oblique_affine(labels.shape, 6.0), study(identity), 3, "T1")
    return mr, segmentation(mr, labels)


def oblique_affine(shape: tuple[int, int, int], voxel_mm: float, degrees: float = 20.0) -> np.ndarray:
    """A RAS affine rotated about the z axis, origin near the grid centre."""
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation * voxel_mm
    affine[:3, 3] = -affine[:3, :3] @ (np.asarray(shape) / 2) + [3.0, -7.0, 11.0]
    return affine


def study(identity: dict[str, str]) -> Dataset:
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
    lps = LPS_TO_RAS @ affine_ras  # the same flip both ways
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
        ds.Manufacturer = "meddpm-deploy phantom"
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
        manufacturer="meddpm-deploy phantom",
        manufacturer_model_name="phantom",
        software_versions="0",
        device_serial_number="1",
        omit_empty_frames=omit_empty_frames,
    )
