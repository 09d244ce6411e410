"""Heads drawn from the MNI152 template: labels and images that agree, reproducible, held out from training."""

from __future__ import annotations

import builtins

import nibabel as nib
import numpy as np
import pytest

from meddpm.errors import ConfigurationError
from meddpm.imaging import template_heads
from meddpm.imaging.demo_heads import head_source, write_masks
from meddpm.imaging.phantom_heads import dice
from meddpm.imaging.template_heads import HEAD, TISSUES, TUMOUR, make_template_head, segment, whole_head

SHAPE, VOXEL_MM = (32, 32, 32), 6.0  # a coarse grid keeps these tests quick
MODEL_SHAPE, MODEL_VOXEL_MM = (64, 64, 64), 3.0  # the mni152-demo model's grid


def test_a_head_is_reproducible_from_its_seed_and_differs_between_seeds():
    first = make_template_head(np.random.default_rng(3), SHAPE, VOXEL_MM)
    again = make_template_head(np.random.default_rng(3), SHAPE, VOXEL_MM)
    other = make_template_head(np.random.default_rng(4), SHAPE, VOXEL_MM)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[1], other[1])


def test_mask_and_image_agree_and_the_tumour_lies_in_the_head():
    tumours = 0
    for seed in range(4):
        rng = np.random.default_rng([1, seed])
        mask, image = make_template_head(rng, MODEL_SHAPE, MODEL_VOXEL_MM, tumour_probability=1.0)
        assert mask.dtype == np.uint8 and image.dtype == np.float32 and mask.shape == image.shape == MODEL_SHAPE
        assert set(np.unique(mask)) <= {0, HEAD, TUMOUR, *TISSUES} and set(TISSUES) <= set(np.unique(mask))
        assert -1.0 <= image.min() and image.max() <= 1.0
        assert image[mask == 0].mean() < -0.95  # background is dark
        head_fraction = (mask > 0).mean()
        assert 0.3 < head_fraction < 0.8, head_fraction  # a head, not an empty or a full box
        labels = segment(image, mask)
        assert dice(labels > 0, mask > 0, True) > 0.95
        for tissue in TISSUES:  # fluid, grey and white matter read back by their T1 bands (0.82-0.94 measured)
            assert dice(labels, mask, tissue) > 0.75, tissue
        merged = whole_head(mask)
        assert set(np.unique(merged)) <= {0, HEAD, TUMOUR} and np.array_equal(merged > 0, mask > 0)
        assert np.array_equal(merged == TUMOUR, mask == TUMOUR)
        if (mask == TUMOUR).any():
            tumours += 1
            assert dice(labels, mask, TUMOUR) > 0.8
            assert image[mask == TUMOUR].max() > image[mask == HEAD].max()  # the enhancing rim is the brightest
    assert tumours >= 3


def test_written_masks_are_held_out_from_training_draws(tmp_path):
    paths = write_masks(head_source("mni152-demo"), tmp_path, 2, seed=0, shape=SHAPE, voxel_mm=VOXEL_MM)
    training = make_template_head(np.random.default_rng([0, 1]), SHAPE, VOXEL_MM)[0]  # training's step 1, seed 0
    for path in paths:
        image = nib.load(path)
        assert image.shape == SHAPE and np.allclose(np.diag(image.affine)[:3], VOXEL_MM)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert not np.array_equal(np.asarray(image.dataobj), training)


def test_without_nilearn_the_error_says_how_to_install_it(monkeypatch):
    real_import = builtins.__import__

    def no_nilearn(name, *args, **kwargs):
        if name == "nilearn":
            raise ImportError("No module named 'nilearn'")
        return real_import(name, *args, **kwargs)

    template_heads.load_template.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_nilearn)
    with pytest.raises(ConfigurationError, match="pip install nilearn"):
        template_heads.load_template()
    monkeypatch.undo()
    template_heads.load_template.cache_clear()
