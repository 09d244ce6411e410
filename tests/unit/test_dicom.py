"""DICOM masks in (SEG, label-map series) and synthetic MR series out, without a PACS."""

from __future__ import annotations

import copy
import os
import re

import numpy as np
import pydicom
import pytest
from nibabel.orientations import io_orientation

from harness.dciodvfy import dciodvfy_errors
from meddpm.dicom.options import DicomOptions, SegmentMap
from meddpm.dicom.phantom_study import image_series, oblique_affine, segmentation
from meddpm.dicom.reader import SEG_SOP_CLASS, read_dicom_mask
from meddpm.dicom.writer import DISPLAY_AXES, Provenance, study_identity, write_series, write_synthesis
from meddpm.errors import InputError
from meddpm.imaging.geometry import LPS_TO_RAS
from meddpm.imaging.masks import LabelMask
from meddpm.input_folders import find_mask_inputs
from meddpm.model.presets import BUILTIN_PRESETS, load_presets
from tests.dicom_samples import PATIENT, leaked_values, save

PRESET = load_presets(BUILTIN_PRESETS)["demo"]
PROVENANCE = Provenance("meddpm_demo", "demo", "ddim", 3, "meddpm-deploy test")


# --- input ----------------------------------------------------------------------------------------------------


def test_seg_is_read_on_its_exact_grid(phantom, tmp_path):
    labels, affine, _, _, seg = phantom
    save([seg], tmp_path / "sub", "seg")
    [found] = find_mask_inputs(tmp_path)
    mask = read_dicom_mask(found, PRESET, None)
    assert found.kind == "seg" and mask.name.startswith("seg_50_")
    np.testing.assert_array_equal(mask.labels, labels)
    np.testing.assert_allclose(mask.affine, affine, atol=1e-4)
    assert mask.dicom.references == [(SEG_SOP_CLASS, seg.SOPInstanceUID)]


def test_label_map_series_is_read_on_its_exact_grid(phantom, tmp_path):
    labels, affine, source_study, _, _ = phantom
    series = image_series(labels, affine, source_study, 7, "labels")
    save(series[::-1], tmp_path, "slice")  # file order says nothing: slices are sorted by position
    [found] = find_mask_inputs(tmp_path)
    mask = read_dicom_mask(found, PRESET, None)
    assert found.kind == "label-map" and len(found.files) == 32
    np.testing.assert_array_equal(mask.labels, labels)
    np.testing.assert_allclose(mask.affine, affine, atol=1e-4)


def test_segments_are_mapped_by_label_or_number(phantom, tmp_path):
    labels, _, _, mr, _ = phantom
    swapped = np.choose(labels, [0, 2, 1]).astype(np.uint8)  # segment 1 is the tumour, segment 2 the brain
    save([segmentation(mr, swapped, {1: "Tumour", 2: "Brain"})], tmp_path, "seg")
    [found] = find_mask_inputs(tmp_path)
    for text in ("brain=1,TUMOUR=2", "2=1,1=2"):
        np.testing.assert_array_equal(read_dicom_mask(found, PRESET, SegmentMap.parse(text)).labels, labels)
    wrong = read_dicom_mask(found, PRESET, None).labels  # by number: the labels come out swapped
    assert np.array_equal(wrong, swapped)


def test_seg_whose_segments_match_no_preset_label(phantom, tmp_path):
    labels, _, _, mr, _ = phantom
    three = labels.copy()
    three[:4] = np.where(labels[:4] == 0, 3, labels[:4])
    save([segmentation(mr, three, {1: "Skull", 2: "Vessel", 3: "Eye"})], tmp_path, "seg")
    [found] = find_mask_inputs(tmp_path)
    with pytest.raises(
        InputError, match=r"segments \[3\] match no label of preset 'demo' \(labels \[1, 2\]\).*--segment-map"
    ):
        read_dicom_mask(found, PRESET, None)
    with pytest.raises(InputError, match="no segment matches the segment map.*1 'Skull', 2 'Vessel', 3 'Eye'"):
        read_dicom_mask(found, PRESET, SegmentMap.parse("Liver=1"))
    with pytest.raises(ValueError, match="not SEGMENT=LABEL"):
        SegmentMap.parse("Brain:1")


def test_series_with_a_missing_slice_or_uneven_spacing_is_refused(phantom, tmp_path):
    labels, affine, source_study, _, _ = phantom
    series = image_series(labels, affine, source_study, 7, "labels")
    save(series[:10] + series[11:], tmp_path / "missing", "slice")
    with pytest.raises(InputError, match=r"1 slice\(s\) missing \(31 present, spacing 6 mm\)"):
        read_dicom_mask(find_mask_inputs(tmp_path / "missing")[0], PRESET, None)
    uneven = image_series(labels, affine, source_study, 8, "labels")
    for ds in uneven[16:]:
        ds.ImagePositionPatient = [
            ds.ImagePositionPatient[0],
            ds.ImagePositionPatient[1],
            ds.ImagePositionPatient[2] + 2.5,
        ]
    save(uneven, tmp_path / "uneven", "slice")
    with pytest.raises(InputError, match="uneven slice spacing \\(6 to 8.5 mm\\)"):
        read_dicom_mask(find_mask_inputs(tmp_path / "uneven")[0], PRESET, None)


def test_mixed_series_in_one_folder(phantom, tmp_path):
    """A SEG wins over image series; without one, each series (by Series Instance UID) is a mask of its own."""
    labels, affine, source_study, mr, seg = phantom
    save(mr, tmp_path / "study", "mr")
    save(image_series(labels, affine, source_study, 7, "labels"), tmp_path / "study", "labels")
    save([seg], tmp_path / "study", "seg")
    [found] = find_mask_inputs(tmp_path / "study")
    assert found.kind == "seg"

    other = np.where(labels == 2, 1, labels).astype(np.uint8)
    save(image_series(labels, affine, source_study, 7, "a"), tmp_path / "two", "x")  # same file-name pattern,
    save(image_series(other, affine, source_study, 9, "b"), tmp_path / "two", "x_")  # interleaved in one folder
    found = find_mask_inputs(tmp_path / "two")
    assert sorted((f.kind, f.name.split("_")[1], len(f.files)) for f in found) == [
        ("label-map", "7", 32),
        ("label-map", "9", 32),
    ]
    masks = {f.name.split("_")[1]: read_dicom_mask(f, PRESET, None) for f in found}
    np.testing.assert_array_equal(masks["7"].labels, labels)
    np.testing.assert_array_equal(masks["9"].labels, other)


def test_corrupt_files_are_named(phantom, tmp_path):
    seg_bytes = phantom[4]
    save([seg_bytes], tmp_path, "seg")
    data = (tmp_path / "seg_000.dcm").read_bytes()
    (tmp_path / "seg_000.dcm").unlink()
    (tmp_path / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.dcm").write_bytes(data[:132] + os.urandom(300))
    found = find_mask_inputs(tmp_path)
    assert len(found) == 2
    for source in found:
        with pytest.raises(InputError, match=rf"{source.files[0].name}: cannot be read as (a )?DICOM.*intact copy"):
            read_dicom_mask(source, PRESET, None)


# --- output ---------------------------------------------------------------------------------------------------


def test_written_series_is_valid_synthetic_and_on_the_source_geometry(phantom, tmp_path):
    labels, affine, _, mr, seg = phantom
    save([seg], tmp_path / "in", "seg")
    mask = read_dicom_mask(find_mask_inputs(tmp_path / "in")[0], PRESET, None)
    volume = np.random.default_rng(0).uniform(-1, 1, labels.shape).astype(np.float32)
    files = write_series(
        tmp_path / "out",
        volume,
        mask.affine,
        identity=study_identity(mask.dicom, DicomOptions()),
        source=mask.dicom,
        written_range=(-1.0, 1.0),
        series_number=1001,
        channel="T1",
        seed=42,
        provenance=PROVENANCE,
    )
    assert len(files) == 32
    for path in files:
        assert dciodvfy_errors(path) == [], path
    written = [pydicom.dcmread(path) for path in files]
    assert_same_voxels(written, volume, mask.affine)
    source_spacing = [float(v) for v in mr[0].PixelSpacing]
    assert sorted(float(v) for v in written[0].PixelSpacing) == pytest.approx(sorted(source_spacing))
    first = written[0]
    assert list(first.ImageType) == ["DERIVED", "SECONDARY", "OTHER"] and first.SyntheticData == "YES"
    assert first.BurnedInAnnotation == "NO" and first.SeriesDescription.startswith("SYNTHETIC T1")
    for fact in ("model meddpm_demo", "preset demo", "scheduler ddim", "3 steps", "seed 42", "not acquired"):
        assert fact in first.DerivationDescription
    [reference] = first.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    assert len({ds.SeriesInstanceUID for ds in written}) == 1 and len({ds.SOPInstanceUID for ds in written}) == 32
    assert -1 < float(first.WindowCenter) < 1 and 1.5 < float(first.WindowWidth) <= 2


def assert_same_voxels(written: list, volume: np.ndarray, affine_ras: np.ndarray) -> None:
    """Every stored pixel lies, by its Image Position and Orientation, on a voxel of `volume`'s grid and holds that
    voxel's value; every voxel is stored once."""
    to_voxel = np.linalg.inv(LPS_TO_RAS @ affine_ras)
    seen = np.zeros(volume.shape, dtype=int)
    for ds in written:
        row_cosine, column_cosine = np.reshape([float(v) for v in ds.ImageOrientationPatient], (2, 3))
        between_rows, between_columns = (float(v) for v in ds.PixelSpacing)
        rows, columns = np.indices((ds.Rows, ds.Columns)).reshape(2, -1)
        world = (
            np.asarray([float(v) for v in ds.ImagePositionPatient])
            + np.outer(columns * between_columns, row_cosine)
            + np.outer(rows * between_rows, column_cosine)
        )
        voxel = to_voxel[:3, :3] @ world.T + to_voxel[:3, 3:]
        index = np.round(voxel).astype(int)
        np.testing.assert_allclose(voxel, index, atol=1e-4)
        real = ds.pixel_array.reshape(-1) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(real, volume[tuple(index)], atol=float(ds.RescaleSlope))
        seen[tuple(index)] += 1
    assert (seen == 1).all()


def display_directions(ds) -> tuple[tuple[int, int], tuple[int, int]]:
    """(LPS axis, sign) nearest to the row and the column direction of one instance."""
    row_cosine, column_cosine = np.reshape([float(v) for v in ds.ImageOrientationPatient], (2, 3))
    return tuple((int(np.argmax(abs(c))), int(np.sign(c[np.argmax(abs(c))]))) for c in (row_cosine, column_cosine))


# RAS affines whose third voxel axis runs along S (axial), A (coronal) or R (sagittal), in either voxel order,
# straight and oblique; DISPLAY_AXES says how each plane must come out.
RAS_AXIS = {"R": [1, 0, 0], "L": [-1, 0, 0], "A": [0, 1, 0], "P": [0, -1, 0], "S": [0, 0, 1], "I": [0, 0, -1]}


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "PRS", "RSA", "LIP", "ASR", "SPL"])
@pytest.mark.parametrize("oblique", [False, True], ids=["straight", "oblique"])
def test_written_slices_are_in_the_display_orientation_of_their_plane(codes, oblique, tmp_path):
    directions = np.array([RAS_AXIS[code] for code in codes], dtype=float).T
    affine = np.eye(4)
    affine[:3, :3] = directions * [1.5, 1.0, 2.0]
    if oblique:
        affine = oblique_affine((1, 1, 1), 1.0, 15.0) @ affine
    affine[:3, 3] = [10.0, -20.0, 30.0]
    volume = np.random.default_rng(1).uniform(-1, 1, (6, 5, 4)).astype(np.float32)
    files = write_series(
        tmp_path / "out",
        volume,
        affine,
        identity=study_identity(None, DicomOptions()),
        source=None,
        written_range=(-1.0, 1.0),
        series_number=1001,
        channel="T1",
        seed=1,
        provenance=PROVENANCE,
    )
    written = [pydicom.dcmread(path) for path in files]
    plane = int(io_orientation(LPS_TO_RAS @ affine)[2, 0])
    assert len(written) == volume.shape[2]  # the slices stay those of the mask's third axis
    assert {display_directions(ds) for ds in written} == {DISPLAY_AXES[plane]}
    assert_same_voxels(written, volume, affine)


def test_one_series_per_sample_and_channel_in_one_study(phantom, tmp_path):
    labels, _, _, _, seg = phantom
    save([seg], tmp_path / "in", "seg")
    mask = read_dicom_mask(find_mask_inputs(tmp_path / "in")[0], PRESET, None)
    rng = np.random.default_rng(2)
    samples = [rng.uniform(-1, 1, (2, *labels.shape)).astype(np.float32) for _ in range(2)]
    series = write_synthesis(
        tmp_path / "dicom",
        samples,
        mask,
        ("T1", "FLAIR"),
        [7, 8],
        options=DicomOptions(),
        written_range=(0.0, 1000.0),
        provenance=PROVENANCE,
    )
    assert [files[0].parent.name for files in series] == [
        "sample_0_T1",
        "sample_0_FLAIR",
        "sample_1_T1",
        "sample_1_FLAIR",
    ]
    firsts = [pydicom.dcmread(files[0]) for files in series]
    assert len({ds.StudyInstanceUID for ds in firsts}) == 1 and len({ds.PatientID for ds in firsts}) == 1
    assert len({ds.SeriesInstanceUID for ds in firsts}) == 4 and [ds.SeriesNumber for ds in firsts] == [
        1001,
        1002,
        1003,
        1004,
    ]
    assert [ds.SeriesDescription.split()[1] for ds in firsts] == ["T1", "FLAIR", "T1", "FLAIR"]
    assert ["seed 7" in firsts[0].DerivationDescription, "seed 8" in firsts[3].DerivationDescription] == [True, True]
    assert_same_voxels([pydicom.dcmread(path) for path in series[0]], (samples[0][0] + 1) * 500, mask.affine)
    assert 400 < float(firsts[0].WindowCenter) < 600 and 900 < float(firsts[0].WindowWidth) <= 1000
    for files in series:
        assert len(files) == 32 and dciodvfy_errors(files[0]) == []


def test_a_uid_seed_gives_a_re_run_the_same_identifiers(phantom, tmp_path):
    """With --dicom-uid-seed, a re-run of a job writes the same UIDs and pseudonym (a PACS stores it once); another
    seed, another mask or no seed gives new ones."""
    labels, affine = phantom[0], phantom[1]
    volume = np.random.default_rng(4).uniform(-1, 1, (1, *labels.shape)).astype(np.float32)

    def identifiers(options: DicomOptions, name: str, run: str) -> list[tuple[str, ...]]:
        mask = LabelMask(name, labels, affine, f"{name}.nii.gz")
        [files] = write_synthesis(
            tmp_path / run,
            [volume],
            mask,
            ("T1",),
            [7],
            options=options,
            written_range=(0.0, 1.0),
            provenance=PROVENANCE,
        )
        keys = ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID", "SeriesInstanceUID", "SOPInstanceUID")
        return [tuple(str(pydicom.dcmread(path).get(key)) for key in keys) for path in files]

    job = DicomOptions(uid_seed="job-0042")
    first, again = identifiers(job, "head", "first"), identifiers(job, "head", "again")
    assert first == again and len({ids[4] for ids in first}) == len(first) == labels.shape[2]
    for other in (
        identifiers(DicomOptions(uid_seed="job-0043"), "head", "other-job"),
        identifiers(job, "neck", "other-mask"),
        identifiers(DicomOptions(), "head", "random"),
    ):
        assert all(a != b for ids, others in zip(first, other) for a, b in zip(ids, others))


def test_a_narrow_window_stays_valid(phantom, tmp_path):
    labels, affine = phantom[0], phantom[1]
    flat = np.full(labels.shape, 0.2, dtype=np.float32) + labels * 0.01  # a window far below 1 wide
    [first, *_] = write_series(
        tmp_path / "flat",
        flat,
        affine,
        identity=study_identity(None, DicomOptions()),
        source=None,
        written_range=(-1.0, 1.0),
        series_number=1,
        channel="T1",
        seed=0,
        provenance=PROVENANCE,
    )
    ds = pydicom.dcmread(first)
    assert float(ds.WindowWidth) < 1 and ds.VOILUTFunction == "LINEAR_EXACT" and dciodvfy_errors(first) == []


def test_identity_policies(phantom, tmp_path):
    _, _, source_study, mr, seg = phantom
    save([seg], tmp_path, "seg")
    source = read_dicom_mask(find_mask_inputs(tmp_path)[0], PRESET, None).dicom

    default = study_identity(source, DicomOptions())
    assert default.StudyInstanceUID != source_study.StudyInstanceUID and default.PatientID.startswith("SYN-")
    assert default.FrameOfReferenceUID != source_study.FrameOfReferenceUID and default.PatientIdentityRemoved == "YES"
    assert leaked_values(default) == [] and default.PatientSex == ""
    assert study_identity(source, DicomOptions()).PatientID != default.PatientID  # a new pseudonym each time

    kept = study_identity(source, DicomOptions("keep-study"))
    assert (
        kept.StudyInstanceUID == source_study.StudyInstanceUID
        and kept.FrameOfReferenceUID == source_study.FrameOfReferenceUID
    )
    assert (kept.PatientName, kept.PatientID, kept.AccessionNumber) == (
        PATIENT["PatientName"],
        PATIENT["PatientID"],
        PATIENT["AccessionNumber"],
    )
    assert kept.PatientIdentityRemoved == "NO"

    copied = study_identity(source, DicomOptions(copy=("PatientAge", "PatientSex")))
    assert (copied.PatientAge, copied.PatientSex) == ("056Y", "F") and copied.PatientID.startswith("SYN-")
    assert copied.StudyInstanceUID != source_study.StudyInstanceUID

    with pytest.raises(InputError, match="keep-study needs a DICOM mask"):
        study_identity(None, DicomOptions("keep-study"))


# --- the app ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"Rows": 65535, "Columns": 65535}, "65535x65535 pixels in 64 frames is beyond what is accepted"),
        ({"Rows": 1000, "Columns": 1000}, "need 8000000 bytes of pixel data, but the file has"),
        ({"NumberOfFrames": 0, "PixelData": b"", "PerFrameFunctionalGroupsSequence": []}, "the SEG is empty (0 frames"),
    ],
)
def test_a_seg_whose_size_does_not_fit_is_refused_before_its_pixels_are_decoded(phantom, tmp_path, change, message):
    seg = copy.deepcopy(phantom[4])
    for keyword, value in change.items():
        setattr(seg, keyword, value)
    save([seg], tmp_path, "seg")
    with pytest.raises(InputError, match=re.escape(message)):
        read_dicom_mask(find_mask_inputs(tmp_path)[0], PRESET, None)
