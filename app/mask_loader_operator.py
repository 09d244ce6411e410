"""Emits one validated label mask per tick."""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from app.report import RunReport
from meddpm.dicom_input import DicomMaskInput, SegmentMap, read_dicom_mask
from meddpm.masks import mask_name, read_mask
from meddpm.presets import Preset

log = logging.getLogger(__name__)


class MaskLoaderOperator(Operator):
    """Reads the next mask of the input (NIfTI, DICOM SEG or label-map series); a mask that fails validation
    is reported and skipped.

    Give it a CountCondition with one tick per path.

    Named Output:
        mask: meddpm.masks.LabelMask
    """

    def __init__(self, fragment: Fragment, *args, mask_inputs: list[Path | DicomMaskInput], preset: Preset,
                 segment_map: SegmentMap | None, report: RunReport, **kwargs):
        self.output_name_mask = "mask"
        self._pending = list(mask_inputs)
        self._preset = preset
        self._segment_map = segment_map
        self._report = report
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output(self.output_name_mask)

    def compute(self, op_input, op_output, context):
        source = self._pending.pop(0)
        dicom = isinstance(source, DicomMaskInput)
        name = source.name if dicom else mask_name(source)
        if self._report.stop.is_set():
            self._report.failed[name] = "skipped: the run was stopped"
            return
        with self._report.step(name):
            mask = read_dicom_mask(source, self._preset, self._segment_map) if dicom else read_mask(source, self._preset)
            log.info("mask %s: %s voxels, labels %s", mask.name, "x".join(map(str, mask.labels.shape)),
                     sorted(set(mask.labels.ravel().tolist()) - {0}))
            op_output.emit(mask, self.output_name_mask)
