"""Masks map onto the network grid and synthetic images come back exactly onto the mask's grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from meddpm.errors import InputError
from meddpm.imaging.geometry import ModelGrid, check_label_fit, condition_channels
from meddpm.imaging.masks import read_mask
from meddpm.imaging.phantom_heads import make_phantom
from meddpm.input_folders import find_mask_inputs
from meddpm.model.presets import get_preset
from tests.conftest import TEST_DATA

DEMO = get_preset("demo")


def phantom_mask(shape=(32, 32, 32), voxel_mm=6.0, seed=0):
    mask, _ = make_phantom(np.random.default_rng(seed), shape, voxel_mm)
    return mask


def test_native_grid_is_exact_and_axes_are_reversed():
    mask = phantom_mask()
    grid = ModelGrid(mask.shape, np.diag([6.0, 6.0, 6.0, 1.0]), DEMO)
    assert grid.exact
    network = grid.labels_to_network(mask)
    assert np.array_equal(network, mask.transpose(2, 1, 0))
    back = grid.image_from_network(network[None].astype(np.float32))
    assert np.array_equal(back[0], mask.astype(np.float32))


def test_condition_channels_follow_preset_order_and_scale(presets):
    labels = np.array([0, 1, 2, 4, 2]).reshape(1, 1, 5)
    symmetric = condition_channels(labels, DEMO)  # labels [1, 2], -1/+1
    assert symmetric.shape == (2, 1, 1, 5)
    assert symmetric[0].ravel().tolist() == [-1, 1, -1, -1, -1] and symmetric[1].ravel().tolist() == [-1, -1, 1, -1, 1]
    binary = condition_channels(labels, presets["tiny-multi"])  # labels [1, 2, 4], 0/1
    assert binary[2].ravel().tolist() == [0, 0, 0, 1, 0]


def test_other_orientations_are_reoriented_and_restored():
    mask = phantom_mask()
    ras = np.diag([6.0, 6.0, 6.0, 1.0])
    lps_mask = mask[::-1, ::-1, :].copy()  # the same head stored left-right and front-back flipped
    lps = np.diag([-6.0, -6.0, 6.0, 1.0])
    expected = ModelGrid(mask.shape, ras, DEMO).labels_to_network(mask)
    grid = ModelGrid(lps_mask.shape, lps, DEMO)
    assert np.array_equal(grid.labels_to_network(lps_mask), expected)
    restored = grid.image_from_network(expected[None].astype(np.float32))
    assert np.array_equal(restored[0], lps_mask.astype(np.float32))


def test_other_voxel_sizes_and_shapes_are_resampled_there_and_back():
    mask = phantom_mask(shape=(70, 60, 64), voxel_mm=3.0, seed=2)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-90, -80, -60]
    grid = ModelGrid(mask.shape, affine, DEMO)
    assert grid.resampled and grid.resampled_shape == (35, 30, 32)
    network = grid.labels_to_network(mask)
    assert network.shape == DEMO.image.grid and set(np.unique(network)) <= {0, 1, 2}
    restored = grid.image_from_network(network[None].astype(np.float32))
    assert restored.shape == (1, *mask.shape)
    brain_back = restored[0] > 0.5
    overlap = 2 * (brain_back & (mask > 0)).sum() / (brain_back.sum() + (mask > 0).sum())
    assert overlap > 0.9, overlap  # labels survive the trip to a 2x coarser grid and back


def test_released_whole_head_mask_on_the_demo_grid():
    mask = read_mask(TEST_DATA / "whole_head_mask_sample_0.nii.gz", DEMO)
    grid = ModelGrid(mask.labels.shape, mask.affine, DEMO)
    network = grid.labels_to_network(mask.labels)
    assert network.shape == (32, 32, 32) and (network == 1).sum() > 1000
    assert grid.image_from_network(np.zeros((1, 32, 32, 32), np.float32)).shape == (1, 128, 128, 128)


def test_released_brats_mask_is_on_the_brats_grid():
    brats = get_preset("brats")
    mask = read_mask(TEST_DATA / "brats2021_01306_seg.nii.gz", brats)
    grid = ModelGrid(mask.labels.shape, mask.affine, brats)
    network = grid.labels_to_network(mask.labels)
    assert network.shape == (144, 192, 192)
    assert set(np.unique(network)) == {0, 1, 2, 3, 4}


# --- bad masks, each named with what is accepted ---------------------------------------------------------


def save(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        find_mask_inputs(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="holds no NIfTI masks"):
        find_mask_inputs(tmp_path)


def test_not_nifti(tmp_path):
    (tmp_path / "mask.png").write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match="not a NIfTI file"):
        read_mask(tmp_path / "mask.png", DEMO)
    (tmp_path / "broken.nii.gz").write_bytes(b"garbage")
    with pytest.raises(InputError, match="cannot be read as NIfTI"):
        read_mask(tmp_path / "broken.nii.gz", DEMO)


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 8, 2)])
def test_wrong_dimensions(tmp_path, shape):
    path = save(tmp_path / "m.nii.gz", np.ones(shape, np.uint8))
    with pytest.raises(InputError, match=f"has {len(shape)} dimensions"):
        read_mask(path, DEMO)


def test_non_integer_values(tmp_path):
    data = np.zeros((8, 8, 8), np.float32)
    data[2, 2, 2] = 0.5
    with pytest.raises(InputError, match=r"non-integer values \(e.g. 0.5\)"):
        read_mask(save(tmp_path / "m.nii.gz", data), DEMO)


def test_unknown_labels_are_named_with_the_presets_labels(tmp_path):
    data = np.zeros((8, 8, 8), np.uint8)
    data[1:3, 1:3, 1:3] = 1
    data[4, 4, 4] = 7
    with pytest.raises(
        InputError, match=r"label values \[7\] are not labels of preset 'demo', which accepts \[0, 1, 2\]"
    ):
        read_mask(save(tmp_path / "m.nii.gz", data), DEMO)


def test_empty_mask(tmp_path):
    with pytest.raises(InputError, match="the mask is empty"):
        read_mask(save(tmp_path / "m.nii.gz", np.zeros((8, 8, 8), np.uint8)), DEMO)


def test_absurd_size_is_refused_before_reading(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((4000, 4000, 4000))
    header.set_data_dtype(np.uint8)
    path = tmp_path / "huge.nii"
    path.write_bytes(header.binaryblock + b"\x00" * 4)  # header only: reading voxels would fail
    with pytest.raises(InputError, match=r"size \(4000, 4000, 4000\) is beyond what is accepted"):
        read_mask(path, DEMO)


def test_singleton_fourth_axis_is_accepted(tmp_path):
    data = phantom_mask()[..., None]
    assert read_mask(save(tmp_path / "m.nii.gz", data), DEMO).labels.shape == (32, 32, 32)


def save_with_header(path, data, **fields):
    """A NIfTI file whose header fields are written as given (nibabel would refuse or repair some of them)."""
    header = nib.Nifti1Image(data, np.diag([6.0, 6.0, 6.0, 1.0])).header
    for name, value in fields.items():
        if isinstance(value, tuple):
            header[name][value[0]] = value[1]
        else:
            header[name] = value
    header["vox_offset"] = 352
    path.write_bytes(header.binaryblock + b"\x00" * 4 + data.tobytes(order="F"))
    return path


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"srow_x": (0, np.nan)}, "holds NaN or infinite values"),
        ({"srow_y": (3, np.inf)}, "holds NaN or infinite values"),
        ({"sform_code": 0, "qform_code": 1, "quatern_b": np.nan}, "holds NaN or infinite values"),
        ({"srow_x": (0, 0.0)}, r"singular \(voxel sizes 0x6x6 mm"),
        ({"srow_x": (1, 6.0), "srow_y": (1, 0.0)}, "singular"),  # two axes along x
        ({"sform_code": 0, "qform_code": 1, "pixdim": (1, 0.0)}, r"voxel size \(pixdim\) is \[0.0, 6.0, 6.0\] mm"),
        ({"sform_code": 0, "qform_code": 0, "pixdim": (2, np.nan)}, r"voxel size \(pixdim\) is \[6.0, nan, 6.0\] mm"),
    ],
)
def test_nan_or_singular_affine_is_refused(tmp_path, fields, message):
    path = save_with_header(tmp_path / "m.nii", phantom_mask(), **fields)
    with pytest.raises(InputError, match=f"m.nii: the header's .*{message}.*copy the header of the image"):
        read_mask(path, DEMO)


# --- what reaches the network grid: refused when meaningless, warned and recorded when partial ------------------


def test_outside_the_network_grid_is_background():
    """Where the network grid does not reach, the image is the model's background (-1), not mid-grey 0."""
    grid = ModelGrid((40, 32, 32), np.diag([6.0, 6.0, 6.0, 1.0]), DEMO)  # 4 columns cropped on each side
    image = grid.image_from_network(np.full((1, 32, 32, 32), 0.5, np.float32))
    assert np.all(image[0, :4] == -1.0) and np.all(image[0, -4:] == -1.0) and np.all(image[0, 4:-4] == 0.5)
    assert DEMO.image.background == -1.0


def test_mask_collapsed_by_its_voxel_size_is_refused():
    mask = phantom_mask()
    grid = ModelGrid(mask.shape, np.diag([1e-6, 1e-6, 1e-6, 1.0]), DEMO)
    fit = grid.fit_labels(mask)
    assert fit.lost_to_voxel_size == [1, 2]
    with pytest.raises(
        InputError,
        match=r"m.nii: no label reaches the model's grid: at the 6x6x6 mm voxels of preset "
        r"'demo' the mask \(32x32x32 voxels of 1e-06x1e-06x1e-06 mm\) becomes 1x1x1 "
        r"voxels.*voxel size in the header is likely wrong",
    ):
        check_label_fit("m.nii", grid, fit)


def test_head_outside_the_field_of_view_is_refused():
    mask = np.zeros((64, 64, 64), np.uint8)
    mask[32:, 32:, 32:] = phantom_mask()  # the head in a corner: the centre crop keeps little of it
    grid = ModelGrid(mask.shape, np.diag([6.0, 6.0, 6.0, 1.0]), DEMO)
    with pytest.raises(
        InputError,
        match=r"m.nii: the model's field of view \(192x192x192 mm, centred on the middle "
        r"of the mask's array\) leaves out too much of the labels \(label 1 8\d.\d%, "
        r"label 2 8\d.\d%; at most 5% of any label is accepted\).*crop it",
    ):
        check_label_fit("m.nii", grid, grid.fit_labels(mask))


def test_a_small_crop_is_warned_and_recorded():
    mask = np.zeros((32, 32, 40), np.uint8)
    mask[:, :, 13:] = phantom_mask()[:, :, :27]  # the head high in the array: its top two slices are cropped
    grid = ModelGrid(mask.shape, np.diag([6.0, 6.0, 6.0, 1.0]), DEMO)
    fit = grid.fit_labels(mask)
    warnings = check_label_fit("m.nii", grid, fit)
    lost = fit.labelled_outside_field_of_view()
    assert 0.01 < lost < 0.05
    per_label = fit.outside_field_of_view()
    assert warnings == [
        f"m.nii: {lost:.1%} of the labelled voxels lie outside the model's field of view "
        f"(192x192x192 mm, centred on the middle of the mask's array) and are cropped away "
        f"(label 1 {per_label[1]:.1%}, label 2 {per_label[2]:.1%}); the image there is background"
    ]
    assert per_label[2] == 0.0 and fit.record()["fraction_outside_field_of_view"]["labelled"] == round(lost, 4)
    assert fit.network_labels.shape == DEMO.image.grid


def test_a_label_too_small_for_the_model_is_warned():
    mask = phantom_mask(shape=(128, 128, 128), voxel_mm=1.5, seed=4)
    mask[mask == 2] = 1
    mask[64, 64, 64] = 2  # 3.4 mm³ of tumour: less than one 6 mm voxel
    grid = ModelGrid(mask.shape, np.diag([1.5, 1.5, 1.5, 1.0]), DEMO)
    fit = grid.fit_labels(mask)
    assert fit.lost_to_voxel_size == [2] and fit.record()["labels_lost_to_voxel_size"] == [2]
    assert check_label_fit("m.nii", grid, fit) == [
        "m.nii: labels [2] vanish at the model's voxel size (6x6x6 mm), "
        "too small or thin for its voxels: the image has no such structure"
    ]
