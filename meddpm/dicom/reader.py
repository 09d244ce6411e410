"""DICOM masks: a DICOM SEG or a label-map image series, read into a LabelMask on its exact grid.

Which DICOM objects of an input folder become masks (searched recursively, any file name):
- every DICOM SEG instance is one mask; when there is any SEG, image series are ignored (a study routed from
  a PACS holds the source MR beside its SEG, and the SEG is the mask);
- without a SEG, every image series (grouped by Series Instance UID) is one label-map mask whose pixel
  values are the labels.
Geometry comes from Image Position/Orientation (Patient) and Pixel Spacing; the affine is converted from
DICOM's LPS to the RAS convention of LabelMask, so that a volume written back on it lies on the same voxels.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections import defaultdict
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import DeflatedExplicitVRLittleEndian

from meddpm.dicom.options import SegmentMap
from meddpm.errors import InputError
from meddpm.imaging.geometry import LPS_TO_RAS, check_affine
from meddpm.imaging.masks import (
    MAX_SIDE,
    MAX_VOXELS,
    LabelMask,
    MaskInput,
    MaskKind,
    check_label_values,
    integer_labels,
)
from meddpm.model.presets import Preset
from meddpm.names import dicom_mask_name, name_digest, printable

log = logging.getLogger(__name__)

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
MAX_SEG_PIXELS = 8 * MAX_VOXELS  # in all frames of a SEG: 1 GiB decoded at a byte a pixel, as 512^3 float64
LABEL_MAP_BITS = (8, 16, 32)  # bits allocated a pixel of a label-map slice
MAX_INFLATED_BYTES = MAX_SEG_PIXELS + 2**24  # a deflated file: the largest SEG accepted, and its headers
_PREAMBLE_BYTES, _GROUP_LENGTH_BYTES = 132, 12  # 'DICM' after 128 bytes; then (0002,0000) UL, explicit VR
POSITION_RTOL = 0.01  # slice positions may deviate by 1% of the spacing
# Attributes of the input kept in memory for the output's identity policy (meddpm.dicom.writer); never logged.
SOURCE_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "StudyDescription",
    "AccessionNumber",
    "ReferringPhysicianName",
    "InstitutionName",
    "FrameOfReferenceUID",
)


@dataclasses.dataclass
class DicomSource:
    """What the DICOM output needs from the input mask: identity (for the policy) and the derivation reference."""

    attributes: Dataset  # SOURCE_ATTRIBUTES present in the input
    references: list[tuple[str, str]]  # (SOP Class UID, SOP Instance UID) of each source object


@dataclasses.dataclass
class DicomLabelMask(LabelMask):
    """A mask read from DICOM: also what a DICOM output of it needs from the source."""

    dicom: DicomSource


def read_dicom(path: Path, stop_before_pixels: bool = False) -> Dataset:
    """pydicom's dcmread, but a deflated file is refused when it inflates beyond MAX_INFLATED_BYTES: pydicom
    inflates the whole file, pixels too, even when asked to stop before them."""
    meta = pydicom.filereader.read_file_meta_info(path)
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        inflater, inflated = zlib.decompressobj(-zlib.MAX_WBITS), 0
        with path.open("rb") as file:
            file.seek(_PREAMBLE_BYTES + _GROUP_LENGTH_BYTES + int(meta.FileMetaInformationGroupLength))
            while not inflater.eof and (chunk := file.read(2**20)):
                while chunk and inflated <= MAX_INFLATED_BYTES:
                    inflated += len(out := inflater.decompress(chunk, 2**24))
                    chunk = inflater.unconsumed_tail if out else b""  # nothing out: it needs more input, or ended
                if inflated > MAX_INFLATED_BYTES:
                    raise InputError(
                        f"{printable(str(path))}: its deflated data inflate to more than {MAX_INFLATED_BYTES} bytes, "
                        f"beyond any mask accepted; crop or downsample it, or send it uncompressed"
                    )
    return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)


def group_dicom(files: list[Path]) -> list[MaskInput]:
    """SEG instances, or else image series; unreadable files become refused inputs that fail alone."""
    segs, series, unreadable, series_numbers = [], defaultdict(list), [], {}
    for path in files:
        try:
            ds = read_dicom(path, stop_before_pixels=True)
            if ds.file_meta.get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY:
                continue  # a DICOMDIR indexes the files; they are found anyway
            sop_class, series_uid = str(ds.SOPClassUID), str(ds.SeriesInstanceUID)
        except InputError as error:
            unreadable.append(MaskInput(f"unreadable_{name_digest(str(path))}", MaskKind.REFUSED, (path,), str(error)))
            continue
        except Exception as error:  # pydicom raises many types for a damaged file
            detail = (
                "no SOP Class UID or Series Instance UID"
                if isinstance(error, AttributeError)
                else f"{type(error).__name__}: {error}"
            )
            unreadable.append(
                MaskInput(
                    f"unreadable_{name_digest(str(path))}",
                    MaskKind.REFUSED,
                    (path,),
                    f"{printable(str(path))}: cannot be read as DICOM ({detail}); replace the file with an intact copy",
                )
            )
            continue
        if sop_class == SEG_SOP_CLASS:
            segs.append(
                MaskInput(dicom_mask_name("seg", ds.get("SeriesNumber"), str(ds.SOPInstanceUID)), MaskKind.SEG, (path,))
            )
        elif "Rows" in ds:
            series[series_uid].append(path)
            series_numbers[series_uid] = ds.get("SeriesNumber")
        else:
            log.info("%s: not an image or SEG (SOP class %s), ignored", printable(str(path)), printable(sop_class))
    if segs and series:
        log.info("ignored %d image series: the input has %d DICOM SEG(s), which are the masks", len(series), len(segs))
        return [*segs, *unreadable]
    label_maps = [
        MaskInput(dicom_mask_name("labelmap", series_numbers[uid], uid), MaskKind.LABEL_MAP, tuple(paths))
        for uid, paths in series.items()
    ]
    return [*segs, *label_maps, *unreadable]


def read_dicom_mask(source: MaskInput, preset: Preset, segment_map: SegmentMap | None) -> DicomLabelMask:
    """Read and validate one DICOM mask for `preset` (raises InputError naming the file and what is accepted)."""
    if source.problem:
        raise InputError(source.problem)
    if source.kind == MaskKind.SEG:
        labels, affine, datasets = _read_seg(source.files[0], preset, segment_map)
        where = str(source.files[0])
    else:
        labels, affine, datasets = _read_label_map(source.files)
        where = f"label-map series in {source.files[0].parent} ({len(source.files)} files)"
    if max(labels.shape) > MAX_SIDE:
        raise InputError(f"{where}: size {labels.shape} is beyond {MAX_SIDE} voxels a side; crop or downsample it")
    check_label_values(where, labels, preset)
    check_affine(where, affine)
    attributes = Dataset()
    for keyword in SOURCE_ATTRIBUTES:
        if keyword in datasets[0]:
            setattr(attributes, keyword, datasets[0][keyword].value)
    references = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets]
    return DicomLabelMask(source.name, labels, LPS_TO_RAS @ affine, where, DicomSource(attributes, references))


def _read_seg(
    path: Path, preset: Preset, segment_map: SegmentMap | None
) -> tuple[np.ndarray, np.ndarray, list[Dataset]]:
    try:
        _check_seg_size(read_dicom(path, stop_before_pixels=True), path)
        seg = hd.seg.segread(path)
    except InputError:
        raise
    except Exception as error:
        raise InputError(
            f"{path}: cannot be read as a DICOM SEG ({type(error).__name__}: {error}); replace the "
            f"file with an intact copy"
        ) from None
    segments = {int(n): str(seg.get_segment_description(n).segment_label) for n in seg.segment_numbers}
    pairs = _segments_to_labels(path, segments, segment_map, preset)
    try:
        volume = seg.get_volume(combine_segments=False, segment_numbers=[number for number, _ in pairs])
    except (ValueError, RuntimeError) as error:
        raise InputError(
            f"{path}: the SEG's frames do not form one regularly spaced 3-D volume ({error}); a mask "
            f"must be a stack of parallel, evenly spaced planes"
        ) from None
    # highdicom's volume is (slice, row, column, segment): combine, then order as (column, row, slice)
    labels = np.zeros(volume.spatial_shape, dtype=np.uint8)
    for index, (_, label) in enumerate(pairs):
        labels[volume.array[..., index] >= 0.5] = label  # later map entries win where segments overlap
    affine = np.asarray(volume.affine, dtype=np.float64)[:, [2, 1, 0, 3]]
    labels, affine = _slices_along_normal(labels.transpose(2, 1, 0), affine)
    return labels, affine, [seg]


def _check_seg_size(header: Dataset, path: Path) -> None:
    """Refuse, before any pixel is decoded, an empty SEG or one whose size is beyond limits or, stored uncompressed,
    beyond its pixel data."""
    frames, segments = int(header.get("NumberOfFrames") or 0), len(header.get("SegmentSequence") or [])
    rows, columns, bits = int(header.get("Rows") or 0), int(header.get("Columns") or 0), int(header.BitsAllocated)
    if frames < 1 or segments < 1 or rows < 1 or columns < 1:
        raise InputError(
            f"{path}: the SEG is empty ({frames} frames, {segments} segments, {rows}x{columns} pixels); "
            f"export the segmentation again with at least one labelled slice"
        )
    if max(rows, columns) > MAX_SIDE or frames > MAX_SIDE * segments or rows * columns * frames > MAX_SEG_PIXELS:
        raise InputError(
            f"{path}: {rows}x{columns} pixels in {frames} frames is beyond what is accepted (at most "
            f"{MAX_SIDE} a side, {MAX_SIDE} frames a segment and {MAX_SEG_PIXELS} pixels in all frames); crop "
            f"or downsample the segmentation, or export only the segments the model uses"
        )
    syntax = header.file_meta.TransferSyntaxUID
    needed = -(-rows * columns * frames * bits // 8)
    if not (syntax.is_encapsulated or syntax.is_deflated) and needed > path.stat().st_size:
        raise InputError(
            f"{path}: Rows, Columns and Number of Frames ({rows}x{columns}x{frames}) need {needed} bytes "
            f"of pixel data, but the file has {path.stat().st_size} bytes; the header does not match its "
            f"pixels: replace the file with an intact copy"
        )


def _segments_to_labels(
    path: Path, segments: dict[int, str], segment_map: SegmentMap | None, preset: Preset
) -> list[tuple[int, int]]:
    """(segment number, preset label) pairs: by number without a map, else by the map's numbers or labels."""
    accepted = list(preset.condition.labels)
    found = ", ".join(f"{n} '{name}'" for n, name in segments.items())
    if segment_map is None:
        unknown = [n for n in segments if n not in accepted]
        if unknown:
            raise InputError(
                f"{path}: segments {unknown} match no label of preset '{preset.name}' (labels {accepted}); the SEG "
                f"has segments {found}. Map them with --segment-map (MEDDPM_SEGMENT_MAP), e.g. "
                f"'{next(iter(segments.values()))}={accepted[0]}'; unmapped segments are then ignored"
            )
        return [(n, n) for n in sorted(segments)]
    pairs = []
    for key, label in segment_map.entries:
        pairs += [(n, label) for n, name in segments.items() if key in (n, name.lower())]
    if not pairs:
        raise InputError(
            f"{path}: no segment matches the segment map; the SEG has segments {found}. Name them "
            f"(by number or label) in --segment-map (MEDDPM_SEGMENT_MAP)"
        )
    ignored = sorted(set(segments) - {n for n, _ in pairs})
    if ignored:
        log.info("%s: segments %s are not in the segment map, ignored", path.name, ignored)
    return pairs


def _read_label_map(files: tuple[Path, ...]) -> tuple[np.ndarray, np.ndarray, list[Dataset]]:
    """Labels, affine and slice headers of a label-map series: all headers are checked before any pixel is decoded."""
    datasets: list[Dataset] = []
    for path in files:
        try:
            ds: Dataset = read_dicom(path, stop_before_pixels=True)
        except Exception as error:
            raise _unreadable_image(path, error) from None
        if int(ds.get("NumberOfFrames") or 1) > 1:
            raise InputError(
                f"{path}: a multi-frame image is not read as a label map; send a DICOM SEG, or the label "
                f"map as single-frame slices"
            )
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if keyword not in ds:
                raise InputError(f"{path}: has no {keyword}; a label-map slice needs its position in the patient")
        datasets.append(ds)
    first = datasets[0]
    where = f"label-map series in {files[0].parent}"
    _check_label_map_size(where, first, len(files))
    for ds, path in zip(datasets, files):
        if _pixel_format(ds) != _pixel_format(first) or not (
            np.allclose(ds.ImageOrientationPatient, first.ImageOrientationPatient, atol=1e-4)
            and np.allclose(ds.PixelSpacing, first.PixelSpacing, rtol=1e-4)
        ):
            raise InputError(
                f"{path}: size, orientation or pixel spacing differ from the other slices of its series; "
                f"a label map must be one stack of parallel slices of one size"
            )
    row, column = (
        np.asarray(first.ImageOrientationPatient[:3], float),
        np.asarray(first.ImageOrientationPatient[3:], float),
    )
    normal = np.cross(row, column)
    positions = np.array([np.asarray(ds.ImagePositionPatient, float) for ds in datasets])
    order = np.argsort(positions @ normal)
    datasets, paths, positions = [datasets[i] for i in order], [files[i] for i in order], positions[order]
    if len(datasets) < 2:
        raise InputError(f"{where}: has one slice; a 3-D label map needs at least two")
    distances = np.diff(positions @ normal)
    step = float(np.median(distances))
    if step <= 0 or np.any(distances < POSITION_RTOL * step):
        raise InputError(
            f"{where}: two slices lie at the same position (a series sent twice, or two series "
            f"sharing a Series Instance UID); keep one copy of each slice"
        )
    if not np.allclose(distances, step, rtol=POSITION_RTOL):
        gaps = distances / step
        if np.allclose(gaps, np.round(gaps), rtol=POSITION_RTOL):
            missing = int(np.round(gaps).sum()) - len(gaps)
            raise InputError(
                f"{where}: {missing} slice(s) missing ({len(datasets)} present, spacing {step:g} mm); "
                f"send the complete series"
            )
        raise InputError(
            f"{where}: uneven slice spacing ({distances.min():g} to {distances.max():g} mm); a label map "
            f"must be evenly spaced (resample it first)"
        )
    slice_step = (positions[-1] - positions[0]) / (len(positions) - 1)
    if not np.allclose(
        positions, positions[0] + np.outer(np.arange(len(positions)), slice_step), atol=POSITION_RTOL * step
    ):
        raise InputError(f"{where}: slice positions do not lie on one straight line; the slices must be one stack")
    labels = np.empty((first.Columns, first.Rows, len(paths)), np.uint8)
    for index, path in enumerate(paths):  # one slice decoded at a time, straight into uint8 labels
        try:
            ds = read_dicom(path)
            values = np.asarray(apply_modality_lut(ds.pixel_array, ds))
        except Exception as error:
            raise _unreadable_image(path, error) from None
        labels[:, :, index] = integer_labels(path, values).T
    spacing_row, spacing_column = (float(v) for v in first.PixelSpacing)  # between rows, between columns
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = row * spacing_column, column * spacing_row, slice_step
    affine[:3, 3] = positions[0]
    return labels, affine, datasets


def _pixel_format(ds: Dataset) -> tuple[int, ...]:
    """Rows, Columns, Bits Allocated, Samples per Pixel (0 where absent, but one sample where unsaid)."""
    return (
        *(int(ds.get(keyword) or 0) for keyword in ("Rows", "Columns", "BitsAllocated")),
        int(ds.get("SamplesPerPixel") or 1),
    )


def _check_label_map_size(where: str, first: Dataset, slices: int) -> None:
    """Refuse, from the headers, a label map whose size or pixel type is beyond what is accepted."""
    rows, columns, bits, samples = _pixel_format(first)
    if min(rows, columns) < 1 or max(rows, columns, slices) > MAX_SIDE or rows * columns * slices > MAX_VOXELS:
        raise InputError(
            f"{where}: {columns}x{rows} pixels in {slices} slices is beyond what is accepted (1 to {MAX_SIDE} "
            f"a side and at most {MAX_VOXELS} voxels in all); crop or downsample the label map"
        )
    if bits not in LABEL_MAP_BITS or samples != 1:
        raise InputError(
            f"{where}: {samples} samples of {bits} bits a pixel; a label-map slice holds one value of "
            f"{', '.join(map(str, LABEL_MAP_BITS))} bits a pixel (a grey-level image, not RGB)"
        )


def _unreadable_image(path: Path, error: Exception) -> InputError:
    return InputError(
        f"{path}: cannot be read as a DICOM image ({type(error).__name__}: {error}); replace the file with an "
        f"intact copy"
    )


def _slices_along_normal(labels: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(column, row, slice) volume ordered so that slices advance along row x column, as scanners store them."""
    if np.dot(np.cross(affine[:3, 0], affine[:3, 1]), affine[:3, 2]) >= 0:
        return labels, affine
    flipped = affine.copy()
    flipped[:3, 3] += affine[:3, 2] * (labels.shape[2] - 1)
    flipped[:3, 2] = -affine[:3, 2]
    return np.ascontiguousarray(labels[:, :, ::-1]), flipped
