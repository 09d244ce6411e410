"""Writes each synthesis atomically: NIfTI volume(s) and/or DICOM series, a PNG preview and a JSON record in one
folder; then sends the DICOM series to the configured PACS."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from monai.deploy.core import Fragment, Operator, OperatorSpec

import meddpm
from app.preview import write_preview
from app.report import RunReport
from meddpm.dicom.options import DicomOptions
from meddpm.errors import Interrupted, PacsError
from meddpm.imaging.formats import OutputFormat
from meddpm.model.served_model import ServedModel
from meddpm.model.tensors import IMAGE_RANGE
from meddpm.output_folders import staged_folder
from meddpm.synthesis import Synthesis

if TYPE_CHECKING:
    from meddpm.dicom.pacs import PacsExporter

log = logging.getLogger(__name__)


class OutputWriterOperator(Operator):
    """Writes OUTPUT/<mask name>/ for each synthesis; the folder appears complete or not at all.

    Files: sample_<i>[_<channel>].nii.gz (one per sample and output channel, on the mask's grid with its
    affine), dicom/sample_<i>_<channel>/NNNN.dcm (one MR series per sample and channel, see
    meddpm.dicom.writer), preview.png (mid-slices of mask and sample 0), record.json (model, settings,
    timings); pacs.json (what each PACS stored, or why not) after the series were sent.

    Named Input:
        synthesis: meddpm.synthesis.Synthesis
    """

    def __init__(
        self,
        fragment: Fragment,
        *args,
        output_folder: Path,
        model: ServedModel,
        rescale: tuple[float, float] | None,
        formats: tuple[OutputFormat, ...],
        dicom: DicomOptions,
        pacs: PacsExporter | None,
        report: RunReport,
        **kwargs,
    ):
        self.input_name_synthesis = "synthesis"
        self._output_folder = output_folder
        self._model = model
        self._rescale = rescale
        self._formats = formats
        self._dicom = dicom
        self._pacs = pacs
        self._report = report
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.input_name_synthesis)

    def compute(self, op_input, op_output, context):
        synthesis: Synthesis = op_input.receive(self.input_name_synthesis)
        with self._report.step(synthesis.mask.name):
            folder = self.write(synthesis)
            self._report.written[synthesis.mask.name] = str(folder)
            log.info("%s: wrote %s", synthesis.mask.name, folder)

    def write(self, synthesis: Synthesis) -> Path:
        target = self._output_folder / synthesis.mask.name
        not_stored = None
        with staged_folder(target) as staging:
            channels = self._model.preset.image.channels
            outputs, series = [], []
            if OutputFormat.NIFTI in self._formats:
                for index, volume in enumerate(synthesis.samples):
                    for channel, name in enumerate(channels):
                        filename = f"sample_{index}{'' if len(channels) == 1 else '_' + name}.nii.gz"
                        self._write_nifti(staging / filename, volume[channel], synthesis.mask.affine)
                        outputs.append(filename)
            if OutputFormat.DICOM in self._formats:
                series = [
                    [path.relative_to(staging) for path in files] for files in self._write_dicom(staging, synthesis)
                ]
                outputs += [f"{files[0].parent}/" for files in series]
            write_preview(staging / "preview.png", synthesis.mask, synthesis.samples[0], channels)
            record = self._record(synthesis, outputs + ["preview.png"])
            (staging / "record.json").write_text(json.dumps(record, indent=2) + "\n")
            if self._pacs is not None:  # before the swap: only what this run wrote is sent
                not_stored = self._send(self._pacs, staging, [[staging / path for path in files] for files in series])
        if not_stored:
            raise type(not_stored)(f"written to {target}, but not stored in the PACS: {not_stored}")
        return target

    def _write_dicom(self, staging: Path, synthesis: Synthesis) -> list[list[Path]]:
        from meddpm.dicom.writer import Provenance, write_synthesis

        record = synthesis.record
        provenance = Provenance(
            self._model.name,
            self._model.preset.name,
            record["scheduler"],
            record["steps"],
            f"meddpm-deploy {meddpm.__version__}",
        )
        return write_synthesis(
            staging / "dicom",
            synthesis.samples,
            synthesis.mask,
            self._model.preset.image.channels,
            record["seeds"],
            options=self._dicom,
            written_range=self._rescale or IMAGE_RANGE,
            provenance=provenance,
        )

    def _send(self, pacs: PacsExporter, folder: Path, series: list[list[Path]]) -> PacsError | Interrupted | None:
        """Store the series in the PACS; pacs.json in `folder` says what was stored, or why not (returned)."""
        try:
            stored = pacs.store(series, stop=self._report.stop)
        except (PacsError, Interrupted) as error:
            (folder / "pacs.json").write_text(json.dumps({"error": str(error)}, indent=2) + "\n")
            return error
        (folder / "pacs.json").write_text(json.dumps(stored, indent=2) + "\n")
        return None

    def _write_nifti(self, path: Path, volume: np.ndarray, affine: np.ndarray) -> None:
        if self._rescale is not None:
            (low, high), (a, b) = self._rescale, IMAGE_RANGE
            volume = low + (volume - a) * (high - low) / (b - a)
        image = nib.Nifti1Image(volume.astype(np.float32), affine)  # a fresh header: nothing copied from input
        image.header.set_xyzt_units("mm")
        image.header["descrip"] = b"synthetic image (Med-DDPM), not acquired"
        nib.save(image, path)

    def _record(self, synthesis: Synthesis, outputs: list[str]) -> dict:
        manifest = self._model.manifest
        return {
            "mask": synthesis.mask.name,
            "outputs": outputs,
            "synthetic": True,
            "model": {
                "name": self._model.name,
                "preset": self._model.preset.to_dict(),
                "checkpoint": dataclasses.asdict(manifest.checkpoint),
                "onnx": dataclasses.asdict(manifest.onnx),
                "manifest_sha256": self._model.manifest_sha256,  # what --model-sha256 pins
                "verification_passed": manifest.verification_passed,
                "sha256_verified": self._model.verified,
            },
            **synthesis.record,
            "intensity": {"model_range": list(IMAGE_RANGE), "written_range": list(self._rescale or IMAGE_RANGE)},
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
