"""Emits one validated label mask per tick."""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from app.report import RunReport
from meddpm.dicom.options import SegmentMap
from meddpm.errors import InputError
from meddpm.imaging.masks import MaskInput
from meddpm.input_folders import read_mask_input
from meddpm.model.presets import Preset
from meddpm.output_folders import check_target

log = logging.getLogger(__name__)


class MaskLoaderOperator(Operator):
    """Reads the next mask of the input (NIfTI, DICOM SEG or label-map series); a mask that was refused, fails
    validation or has an output folder the writer may not replace is reported and skipped.

    Give it a CountCondition with one tick per path.

    Named Output:
        mask: meddpm.imaging.masks.LabelMask
    """

    def __init__(
        self,
        fragment: Fragment,
        *args,
        mask_inputs: list[MaskInput],
        output_folder: Path,
        preset: Preset,
        segment_map: SegmentMap | None,
        report: RunReport,
        **kwargs,
    ):
        self.output_name_mask = "mask"
        self._pending = list(mask_inputs)
        self._output_folder = output_folder
        self._preset = preset
        self._segment_map = segment_map
        self._report = report
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output(self.output_name_mask)

    def compute(self, op_input, op_output, context):
        source: MaskInput = self._pending.pop(0)
        if self._report.stop.is_set():
            self._report.failed[source.name] = "skipped: the run was stopped"
            return
        with self._report.step(source.name):
            if source.problem:
                raise InputError(source.problem)
            check_target(self._output_folder / source.name)
            mask = read_mask_input(source, self._preset, self._segment_map)
            log.info(
                "mask %s: %s voxels, labels %s",
                mask.name,
                "x".join(map(str, mask.labels.shape)),
                sorted(set(mask.labels.ravel().tolist()) - {0}),
            )
            op_output.emit(mask, self.output_name_mask)
