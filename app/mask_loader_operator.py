"""Emits one validated label mask per tick."""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from app.report import RunReport
from meddpm.masks import mask_name, read_mask
from meddpm.presets import Preset

log = logging.getLogger(__name__)


class MaskLoaderOperator(Operator):
    """Reads the next NIfTI mask of the input; a mask that fails validation is reported and skipped.

    Give it a CountCondition with one tick per path.

    Named Output:
        mask: meddpm.masks.LabelMask
    """

    def __init__(self, fragment: Fragment, *args, mask_paths: list[Path], preset: Preset, report: RunReport, **kwargs):
        self.output_name_mask = "mask"
        self._pending = list(mask_paths)
        self._preset = preset
        self._report = report
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output(self.output_name_mask)

    def compute(self, op_input, op_output, context):
        path = self._pending.pop(0)
        if self._report.stop.is_set():
            self._report.failed[mask_name(path)] = "skipped: the run was stopped"
            return
        with self._report.step(mask_name(path)):
            mask = read_mask(path, self._preset)
            log.info("mask %s: %s voxels, labels %s", mask.name, "x".join(map(str, mask.labels.shape)),
                     sorted(set(mask.labels.ravel().tolist()) - {0}))
            op_output.emit(mask, self.output_name_mask)
