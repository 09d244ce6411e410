"""The memory estimates (one UNet step in process; one mask's whole run) and the checks that refuse what cannot fit."""

from __future__ import annotations

import numpy as np
import pytest

from meddpm.errors import ConfigurationError, InputError
from meddpm.imaging import memory
from meddpm.imaging.geometry import ModelGrid
from meddpm.model.presets import get_preset

WHOLE_HEAD = get_preset("whole-head")
WEIGHTS = 155 * 2**20  # the whole-head ONNX file


def test_activations_scale_with_voxels_and_batch():
    small = memory.skip_bytes(WHOLE_HEAD, (64, 64, 64))
    assert memory.skip_bytes(WHOLE_HEAD, (128, 128, 128)) == pytest.approx(8 * small, rel=1e-3)
    assert memory.skip_bytes(WHOLE_HEAD, (64, 64, 64), batch=3) == 3 * small


def test_estimate_follows_the_measured_peaks():
    """Peaks measured by benchmarks/step_memory.py (ONNX Runtime, 2-core CPU), within 10%; 128^3 was not fitted."""
    for side, measured_mib in ((64, 1439), (96, 3743), (128, 7953)):
        estimate = memory.step_memory_estimate(WHOLE_HEAD, (side,) * 3, 1, WEIGHTS) / 2**20
        assert estimate == pytest.approx(measured_mib, rel=0.10), side


def test_check_suggests_a_batch_that_fits(monkeypatch):
    one = memory.step_memory_estimate(WHOLE_HEAD, WHOLE_HEAD.image.grid, 1, WEIGHTS)
    two = memory.step_memory_estimate(WHOLE_HEAD, WHOLE_HEAD.image.grid, 2, WEIGHTS)
    monkeypatch.setattr(memory, "available_bytes", lambda: (one + two) // 2)
    memory.check_fits(WHOLE_HEAD, 1, WEIGHTS)
    with pytest.raises(ConfigurationError, match="with batch 4 needs about .* use --batch-size 1,"):
        memory.check_fits(WHOLE_HEAD, 4, WEIGHTS)
    monkeypatch.setattr(memory, "available_bytes", lambda: one // 2)
    with pytest.raises(ConfigurationError, match="free memory, or run the UNet on a GPU server"):
        memory.check_fits(WHOLE_HEAD, 1, WEIGHTS)


# --- one mask: its volumes, on the grid it is resampled to, beside the step ------------------------------------

DEMO = get_preset("demo")
DEMO_WEIGHTS = 3_572_642  # the demo model's ONNX file
NIFTI, BOTH = ("nifti",), ("nifti", "dicom")
# Peak RSS of the app synthesising one mask (python -m benchmarks.mask_memory: demo model in process, DDIM 2 steps,
# ONNX Runtime 1.31, MONAI 1.6, 2-core CPU, 2026-12-01): (mask side, voxel mm, samples, output formats, torch
# threads, MiB). One torch thread (OMP_NUM_THREADS=1) makes MONAI's smoothing cost more, the more it smooths.
MEASURED_RUNS = [
    (32, 6.0, 1, NIFTI, 2, 658),  # the network grid itself
    (128, 1.5, 1, NIFTI, 2, 681),
    (256, 0.75, 1, NIFTI, 2, 807),
    (256, 0.75, 8, NIFTI, 2, 1255),
    (256, 0.75, 30, NIFTI, 2, 2670),  # 30 samples held on the mask's grid
    (32, 24.0, 1, NIFTI, 2, 840),  # resampled to 128^3, smoothed on the way back
    (32, 48.0, 1, NIFTI, 2, 1740),  # resampled to 256^3
    (24, 64.0, 1, NIFTI, 2, 1808),  # resampled to 256^3, more smoothing
    (256, 0.75, 1, BOTH, 2, 1096),
    (256, 0.75, 4, BOTH, 2, 1289),
    (32, 48.0, 1, BOTH, 2, 1740),
    (32, 24.0, 1, NIFTI, 1, 839),
    (32, 48.0, 1, NIFTI, 1, 3388),
]


def demo_grid(side: int, voxel_mm: float) -> ModelGrid:
    return ModelGrid((side,) * 3, np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0]), DEMO)


@pytest.mark.parametrize("side, voxel_mm, samples, formats, threads, measured_mib", MEASURED_RUNS)
def test_mask_estimate_follows_the_measured_peaks(monkeypatch, side, voxel_mm, samples, formats, threads, measured_mib):
    """Never below a measured peak, and at most 25% above it."""
    monkeypatch.setattr(memory.torch, "get_num_threads", lambda: threads)
    estimate = memory.mask_memory_estimate(demo_grid(side, voxel_mm), samples, 1, DEMO_WEIGHTS, formats) / 2**20
    assert measured_mib <= estimate <= 1.25 * measured_mib


def test_a_mask_too_large_at_the_models_voxel_size_is_refused():
    """32 voxels of 100 mm are 533 a side at 6 mm: the limits hold on that grid, not only on the file's."""
    with pytest.raises(
        InputError,
        match=r"m.nii: its 32x32x32 voxels of 100x100x100 mm are 533x533x533 voxels at "
        r"the model's 6x6x6 mm, beyond what is accepted \(at most 1024 voxels a side "
        r"and 134217728 in all\); if the voxel size in the header is wrong",
    ):
        memory.check_mask_fits("m.nii", demo_grid(32, 100.0), 1, 1, DEMO_WEIGHTS, ("nifti",))


def test_a_mask_run_that_cannot_fit_is_refused_naming_the_samples_that_fit(monkeypatch):
    grid = demo_grid(256, 0.75)
    ten = memory.mask_memory_estimate(grid, 10, 1, DEMO_WEIGHTS, ("nifti",))
    monkeypatch.setattr(memory, "resident_bytes", lambda: 600 * 2**20)
    monkeypatch.setattr(memory, "available_bytes", lambda: ten - 600 * 2**20)
    memory.check_mask_fits("m.nii", grid, 10, 1, DEMO_WEIGHTS, ("nifti",))
    with pytest.raises(
        InputError,
        match=r"m.nii: 30 sample\(s\) of this mask need about 2.7 GiB in this process "
        r"\(its 256x256x256 voxels of 0.75x0.75x0.75 mm are 32x32x32 voxels at the "
        r"model's 6x6x6 mm; the volumes alone 2.0 GiB\), but 1.\d GiB is available to "
        r"it; use --samples 10 \(or fewer\), crop the mask",
    ):
        memory.check_mask_fits("m.nii", grid, 30, 1, DEMO_WEIGHTS, ("nifti",))
    monkeypatch.setattr(memory, "available_bytes", lambda: 0)
    with pytest.raises(InputError, match="available to it; crop the mask to the head"):
        memory.check_mask_fits("m.nii", grid, 1, 1, DEMO_WEIGHTS, ("nifti",))


def test_a_unet_on_a_server_costs_this_process_no_step():
    grid = demo_grid(32, 6.0)
    in_process = memory.mask_memory_estimate(grid, 1, 1, DEMO_WEIGHTS, ("nifti",))
    served = memory.mask_memory_estimate(grid, 1, 1, None, ("nifti",))
    assert (
        in_process - served
        == memory.step_memory_estimate(DEMO, DEMO.image.grid, 1, DEMO_WEIGHTS) - memory.BASELINE_BYTES
    )
