"""Masks are bounded before they are read: sizes and voxel types come from headers, voxels are read narrow."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

from meddpm.dicom.phantom_study import image_series
from meddpm.errors import InputError
from meddpm.imaging.masks import read_mask
from meddpm.input_folders import find_mask_inputs, read_mask_input
from meddpm.model.presets import BUILTIN_PRESETS, load_presets
from tests.dicom_samples import save, study

DEMO = load_presets(BUILTIN_PRESETS)["demo"]


def nifti(path, data, dtype=None):
    image = nib.Nifti1Image(data, np.eye(4))
    if dtype is not None:
        image.set_data_dtype(dtype)
    nib.save(image, path)
    return path


def test_complex_and_non_numeric_voxel_types_are_refused_from_the_header(tmp_path):
    data = np.zeros((8, 8, 8), np.complex64)
    data[2:5, 2:5, 2:5] = 1 + 5j  # was read as label 1
    with pytest.raises(InputError, match="voxel type complex64 is not accepted.*save it as uint8"):
        read_mask(nifti(tmp_path / "complex.nii.gz", data), DEMO)
    header = nib.Nifti1Header()  # 512^3 complex128 claimed by a header alone: refused before any voxel is read
    header.set_data_shape((512, 512, 512))
    header.set_data_dtype(np.complex128)
    (tmp_path / "claimed.nii").write_bytes(header.binaryblock + b"\x00" * 4)
    with pytest.raises(InputError, match="voxel type complex128 is not accepted"):
        read_mask(tmp_path / "claimed.nii", DEMO)
    rgb = np.zeros((8, 8, 8), [("R", "u1"), ("G", "u1"), ("B", "u1")])
    with pytest.raises(InputError, match="voxel type RGB is not accepted"):
        read_mask(nifti(tmp_path / "rgb.nii.gz", rgb), DEMO)


def test_header_extensions_are_bounded(tmp_path):
    data = np.zeros((8, 8, 8), np.uint8)
    data[2:5, 2:5, 2:5] = 1
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.extensions.append(nib.nifti1.Nifti1Extension(0, b"\x00" * 2**25))  # 32 MiB in a few KB of gzip
    nib.save(image, tmp_path / "extended.nii.gz")
    assert (tmp_path / "extended.nii.gz").stat().st_size < 2**20
    with pytest.raises(InputError, match=r"voxels start after \d+ bytes of header extensions; at most 16777216"):
        read_mask(tmp_path / "extended.nii.gz", DEMO)


def test_a_float64_mask_is_read_without_a_float64_copy(tmp_path):
    """512x512x256 float64 is 512 MiB decoded; read in slabs into uint8 labels, the peak grows by far less."""
    data = np.zeros((512, 512, 256), np.float64)
    data[100:300, 100:300, 50:200] = 1
    data[150:250, 150:250, 100:150] = 2
    path = nifti(tmp_path / "float64.nii.gz", data)
    del data
    script = (
        "import resource, sys; from pathlib import Path; from meddpm.imaging.masks import read_mask; "
        "from meddpm.model.presets import BUILTIN_PRESETS, load_presets; "
        "preset = load_presets(BUILTIN_PRESETS)['demo']; "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "mask = read_mask(Path(sys.argv[1]), preset); "
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before; "
        "print(mask.labels.dtype, int(mask.labels.sum()), grown // 1024)"
    )
    result = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True, check=True)
    dtype, total, grown_mib = result.stdout.split()
    assert (dtype, int(total)) == ("uint8", 200 * 200 * 150 + 100 * 100 * 50)
    assert int(grown_mib) < 512, f"reading grew the peak by {grown_mib} MiB"  # 805 MiB before slabs


@pytest.mark.parametrize("short_pixels", [False, True])
def test_label_map_sides_are_checked_from_the_headers_before_any_pixel_is_decoded(phantom, tmp_path, short_pixels):
    """Deflated 4096x4096 slices (32 MiB each, 33 kB stored); with short pixel data, decoding would fail."""
    labels = np.zeros((4096, 4096, 2), np.uint8)
    labels[1:3, 1:3] = 1
    series = image_series(labels, np.eye(4), phantom[2], 9, "labels")
    for ds in series:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        if short_pixels:
            ds.PixelData = b"\x00" * 8
    save(series, tmp_path, "slice")
    [found] = find_mask_inputs(tmp_path)
    with pytest.raises(InputError, match=r"4096x4096 pixels in 2 slices is beyond what is accepted"):
        read_mask_input(found, DEMO)


def test_a_deflated_seg_is_read(phantom, tmp_path):
    labels, affine, _, _, seg = phantom
    seg = copy.deepcopy(seg)
    seg.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian  # smaller than its frames: not truncated
    save([seg], tmp_path, "seg")
    mask = read_mask_input(find_mask_inputs(tmp_path)[0], DEMO)
    np.testing.assert_array_equal(mask.labels, labels)


def test_a_compressed_seg_whose_frames_decode_beyond_the_bound_is_refused_from_its_header(phantom, tmp_path):
    seg = copy.deepcopy(phantom[4])
    seg.file_meta.TransferSyntaxUID = RLELossless  # a few bytes a frame stored, 1 MiB a frame decoded
    seg.Rows, seg.Columns, seg.NumberOfFrames, seg.BitsAllocated = 1024, 1024, 2048, 8
    seg.PixelData = encapsulate([b"\x00" * 64])
    seg["PixelData"].VR, seg["PixelData"].is_undefined_length = "OB", True
    save([seg], tmp_path, "seg")
    with pytest.raises(InputError, match=r"1024x1024 pixels in 2048 frames is beyond what is accepted"):
        read_mask_input(find_mask_inputs(tmp_path)[0], DEMO)


def test_a_very_deep_input_tree_does_not_lose_the_run(tmp_path, caplog):
    data = np.zeros((8, 8, 8), np.uint8)
    data[2:5, 2:5, 2:5] = 1
    nifti(tmp_path / "beside.nii.gz", data)
    deep = tmp_path
    for _ in range(1500):  # os.walk recursed once a level: RecursionError (so do os.makedirs and rmtree)
        deep /= "d"
        deep.mkdir()
    try:
        with caplog.at_level(logging.WARNING):
            found = find_mask_inputs(tmp_path)
    finally:
        while deep != tmp_path:
            deep.rmdir()
            deep = deep.parent
    assert [source.name for source in found] == ["beside"]
    assert "levels below the input folder and are not searched for masks" in caplog.text


def test_a_deflated_file_that_inflates_beyond_any_mask_is_refused_before_pydicom_inflates_it(tmp_path, monkeypatch):
    """pydicom inflates a deflated file whole, even to read its header: the inflated size is bounded first."""
    from meddpm.dicom import reader

    slices = image_series(np.zeros((1024, 1024, 2), np.uint16), np.eye(4), study(), 5, "labels")
    for ds in slices:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian  # pydicom deflates as it saves
    paths = save(slices, tmp_path / "in", "slice")
    assert all(path.stat().st_size < 2**16 for path in paths)  # 2 MiB of pixels each, a few kB on disk
    monkeypatch.setattr(reader, "MAX_INFLATED_BYTES", 2**20)
    refused = find_mask_inputs(tmp_path / "in")
    assert len(refused) == 2 and all(f"inflate to more than {2**20} bytes" in r.problem for r in refused)
