"""The in-process memory estimate and the check that refuses a step that cannot fit."""

from __future__ import annotations

import pytest

from meddpm import memory
from meddpm.errors import ConfigurationError
from meddpm.presets import get_preset

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
