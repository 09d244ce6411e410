"""Runs the core's per-mask pipeline (meddpm.synthesis) for each mask: condition, sample, map back, record."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from app.report import RunReport
from meddpm.imaging.formats import OutputFormat
from meddpm.imaging.masks import LabelMask
from meddpm.imaging.memory import check_mask_fits, check_mask_output_fits
from meddpm.sampling.denoiser import Denoiser
from meddpm.sampling.request import SamplingRequest
from meddpm.synthesis import Synthesis, SynthesisPipeline

progress_log = logging.getLogger("meddpm.progress")


class SynthesisOperator(Operator):
    """Synthesises the samples of one mask per tick: the core's pipeline, after this run's memory and disk checks.

    Named Input:
        mask: meddpm.imaging.masks.LabelMask
    Named Output:
        synthesis: meddpm.synthesis.Synthesis
    """

    def __init__(
        self,
        fragment: Fragment,
        *args,
        pipeline: SynthesisPipeline,
        request: SamplingRequest,
        denoiser: Denoiser,
        report: RunReport,
        output_formats: tuple[OutputFormat, ...],
        output_folder: Path,
        **kwargs,
    ):
        self.input_name_mask = "mask"
        self.output_name_synthesis = "synthesis"
        self._pipeline = pipeline
        self._request = request
        self._denoiser = denoiser  # in process, its runtime's memory counts in this process's estimate
        self._output_formats = output_formats  # what the writer will hold in memory counts before sampling
        self._output_folder = output_folder  # and what it will write, on that disk
        self._report = report
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.input_name_mask)
        spec.output(self.output_name_synthesis)

    def start(self):
        self._report.graph_started.set()

    def compute(self, op_input, op_output, context):
        mask: LabelMask = op_input.receive(self.input_name_mask)
        with self._report.step(mask.name):
            op_output.emit(self.synthesise(mask), self.output_name_synthesis)

    def synthesise(self, mask: LabelMask) -> Synthesis:
        """The pipeline's synthesis of one mask; a mask whose run cannot fit in memory (InputError) or its outputs
        on the disk (OutputError), or whose labels do not reach the network grid, is refused before any work."""
        pipeline, samples = self._pipeline, self._request.samples
        grid = pipeline.grid(mask)
        in_process = self._denoiser.in_process
        check_mask_fits(
            mask.source,
            grid,
            samples,
            min(pipeline.batch_size, samples),
            pipeline.model.onnx_path.stat().st_size if in_process else None,
            self._output_formats,
            self._denoiser.runtime if in_process else None,
        )
        check_mask_output_fits(mask.source, self._output_folder, grid, samples, self._output_formats)
        return pipeline(mask, self._request, grid=grid, progress=StepProgress, stop=self._report.stop)


class StepProgress:
    """Logs each step (DEBUG), every tenth of the run (INFO), and a live line on a terminal."""

    def __init__(self, label: str):
        self.label = label
        self.live = sys.stderr.isatty()

    def __call__(self, done: int, total: int, elapsed: float) -> None:
        remaining = elapsed / done * (total - done)
        line = f"{self.label}: step {done}/{total}, {elapsed:.1f} s elapsed, ~{remaining:.1f} s to go"
        progress_log.debug(line)
        if done == total or done == 1 or done % max(1, total // 10) == 0:
            progress_log.info(line)
        if self.live:
            print("\r" + line, end="\n" if done == total else "", file=sys.stderr, flush=True)
