"""The per-mask pipeline: one label mask in, synthetic volumes on the mask's own grid out, with the record of how.

    mask grid -> network grid (labels fitted, losses warned) -> condition channels
      -> the sampler, batch by batch -> non-finite check -> each volume back onto the mask's grid -> record

Every caller runs this one pipeline, as a diffusers pipeline owns the steps around its loop: the app's synthesis
operator (which adds its memory and disk checks and its progress lines), the quality and sampling-loop
benchmarks. What runs the loop is a `Sampler` (meddpm.sampling.loop): the loop in this process on a denoiser
(`DenoiserLoop`), or the loop inside Triton (`TritonServerLoop`); the volumes are the same.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from meddpm.errors import ModelError
from meddpm.imaging.geometry import ModelGrid, check_label_fit, condition_channels
from meddpm.imaging.masks import LabelMask
from meddpm.model.served_model import ServedModel
from meddpm.sampling.loop import Progress, Sampler
from meddpm.sampling.request import SamplingRequest

log = logging.getLogger(__name__)

BatchProgress = Callable[[str], Progress]  # a batch's label ("<mask> batch 1/2") -> that batch's progress callback


@dataclasses.dataclass
class Synthesis:
    mask: LabelMask
    samples: list[np.ndarray]  # one (C, X, Y, Z) float32 volume per seed, on the mask's grid, in [-1, 1]
    record: dict


@dataclasses.dataclass(frozen=True)
class SynthesisPipeline:
    """`model`'s synthesis of a mask, its samples run by `sampler` at most `batch_size` at a time."""

    model: ServedModel
    sampler: Sampler
    batch_size: int = 1

    def grid(self, mask: LabelMask) -> ModelGrid:
        """The mapping between the mask's grid and the model's (what a caller checks before sampling)."""
        return ModelGrid(mask.labels.shape, mask.affine, self.model.preset)

    def __call__(
        self,
        mask: LabelMask,
        request: SamplingRequest,
        *,
        grid: ModelGrid | None = None,
        progress: BatchProgress | None = None,
        stop: threading.Event | None = None,
    ) -> Synthesis:
        """The request's samples of one mask. Setting `stop` ends the loop before its next step (Interrupted); a
        model that computes non-finite values is a ModelError, and nothing is returned."""
        preset = self.model.preset
        started = time.monotonic()
        grid = grid or self.grid(mask)
        fit = grid.fit_labels(mask.labels)
        for warning in check_label_fit(mask.source, grid, fit):
            log.warning("%s", warning)
        condition = condition_channels(fit.network_labels, preset)
        prepared = time.monotonic()
        batches = request.batches(self.batch_size)
        images = []
        for number, batch in enumerate(batches, 1):
            batch_progress = progress(f"{mask.name} batch {number}/{len(batches)}") if progress else None
            images.append(self.sampler.sample(condition, batch, preset, progress=batch_progress, stop=stop))
        sampled = time.monotonic()
        if not all(np.isfinite(image).all() for image in images):
            raise ModelError(
                f"{self.model.onnx_path}: the model computed non-finite values (NaN or infinity), so nothing was "
                f"written; re-run `python -m export` to export and verify it again (with --precision bf16 or mixed, "
                f"try fp32)"
            )
        volumes = [grid.image_from_network(image) for image in np.concatenate(images)]
        record = {
            "scheduler": request.scheduler,
            "steps": request.steps,
            "seeds": request.seeds,
            "batch_size": self.batch_size,
            "backend": self.sampler.name,
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
                "per_step": round((sampled - prepared) / (request.steps * len(batches)), 4),
                "restore": round(time.monotonic() - sampled, 3),
            },
        }
        return Synthesis(mask, volumes, record)
