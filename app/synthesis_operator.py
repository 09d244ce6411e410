"""Runs the sampling loop for each mask: condition on the network grid, sample, map back to the mask grid."""

from __future__ import annotations

import dataclasses
import functools
import logging
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from monai.deploy.core import Fragment, Operator, OperatorSpec

from app.report import RunReport
from app.settings import SamplingSettings
from meddpm.errors import ModelError
from meddpm.imaging.formats import OutputFormat
from meddpm.imaging.geometry import ModelGrid, check_label_fit, condition_channels
from meddpm.imaging.masks import LabelMask
from meddpm.imaging.memory import check_mask_fits, check_mask_output_fits
from meddpm.model.repository import ServedModel
from meddpm.sampling.denoiser import Denoiser
from meddpm.sampling.loop import sample
from meddpm.sampling.request import SamplingRequest
from meddpm.sampling.schedulers import default_steps

if TYPE_CHECKING:
    from meddpm.backends.triton_client.server_loop import TritonServerLoop

log = logging.getLogger(__name__)
progress_log = logging.getLogger("meddpm.progress")


@dataclasses.dataclass
class Synthesis:
    mask: LabelMask
    samples: list[np.ndarray]  # one (C, X, Y, Z) float32 volume per seed, on the mask's grid, in [-1, 1]
    record: dict


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """The settings resolved against the model's preset: what every mask of the run gets, in batches."""

    request: SamplingRequest
    batch_size: int

    @classmethod
    def resolve(cls, settings: SamplingSettings, model: ServedModel) -> SamplingPlan:
        schedule = model.preset.schedule
        scheduler = settings.scheduler or schedule.default_scheduler
        steps = settings.steps or default_steps(scheduler, schedule)
        seed = settings.seed if settings.seed is not None else secrets.randbelow(2**31)
        request = SamplingRequest(scheduler, steps, seed, settings.samples)
        request.check(schedule)
        return cls(request, settings.batch_size)


class SynthesisOperator(Operator):
    """Synthesises the samples of one mask per tick.

    Named Input:
        mask: meddpm.imaging.masks.LabelMask
    Named Output:
        synthesis: Synthesis
    """

    def __init__(
        self,
        fragment: Fragment,
        *args,
        model: ServedModel,
        denoiser: Denoiser,
        plan: SamplingPlan,
        report: RunReport,
        output_formats: tuple[OutputFormat, ...],
        output_folder: Path,
        server_loop: TritonServerLoop | None = None,
        **kwargs,
    ):
        self.input_name_mask = "mask"
        self.output_name_synthesis = "synthesis"
        self._model = model
        self._denoiser = denoiser
        self._plan = plan
        self._output_formats = output_formats  # what the writer will hold in memory counts before sampling
        self._output_folder = output_folder  # and what it will write, on that disk
        self._report = report
        self._server_loop = server_loop  # when set, the loop runs inside Triton instead of here
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
        """Sample the plan's seeds for one mask; a mask whose run cannot fit in memory (InputError) or its outputs
        on the disk (OutputError), or whose labels do not reach the network grid, is refused before any work."""
        preset, plan = self._model.preset, self._plan
        started = time.monotonic()
        grid = ModelGrid(mask.labels.shape, mask.affine, preset)
        samples = plan.request.samples
        check_mask_fits(
            mask.source,
            grid,
            samples,
            min(plan.batch_size, samples),
            self._model.onnx_path.stat().st_size if self._denoiser.in_process else None,
            self._output_formats,
            self._denoiser.runtime if self._denoiser.in_process else None,
        )
        check_mask_output_fits(mask.source, self._output_folder, grid, samples, self._output_formats)
        fit = grid.fit_labels(mask.labels)
        for warning in check_label_fit(mask.source, grid, fit):
            log.warning("%s", warning)
        condition = condition_channels(fit.network_labels, preset)
        prepared = time.monotonic()
        batches = plan.request.batches(plan.batch_size)
        loop = self._server_loop.sample if self._server_loop else functools.partial(sample, self._denoiser)
        images = []
        for number, batch in enumerate(batches, 1):
            label = f"{mask.name} batch {number}/{len(batches)}"
            images.append(loop(condition, batch, preset, progress=StepProgress(label), stop=self._report.stop))
        sampled = time.monotonic()
        if not all(np.isfinite(image).all() for image in images):
            raise ModelError(
                f"{self._model.onnx_path}: the model computed non-finite values (NaN or infinity), so nothing was "
                f"written; re-run `python -m export` to export and verify it again (with --precision bf16 or mixed, "
                f"try fp32)"
            )
        volumes = [grid.image_from_network(image) for image in np.concatenate(images)]
        record = {
            "scheduler": plan.request.scheduler,
            "steps": plan.request.steps,
            "seeds": plan.request.seeds,
            "batch_size": plan.batch_size,
            "backend": (self._server_loop or self._denoiser).name,
            "grid": {
                "mask_shape": list(mask.labels.shape),
                "network_grid": list(preset.image.grid),
                "resampled": grid.resampled,
                "exact": grid.exact,
                **fit.record(),
            },
            "timings_s": {
                "prepare": round(prepared - started, 3),
                "sampling": round(sampled - prepared, 3),
                "per_step": round((sampled - prepared) / (plan.request.steps * len(batches)), 4),
                "restore": round(time.monotonic() - sampled, 3),
            },
        }
        return Synthesis(mask, volumes, record)


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
