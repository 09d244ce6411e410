"""Export the conditional denoiser to ONNX and verify the graph against the PyTorch model."""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from meddpm.errors import ExportVerificationError
from meddpm.model.presets import ConditionScale, Preset
from meddpm.model.tensors import CONDITION, INPUTS, NOISY_IMAGE, PREDICTED_NOISE, TIMESTEP
from meddpm.model.unet import ConditionalDenoiser

OPSET = 18
SPATIAL_AXES = ("depth", "height", "width")
# The graph passes when max |onnx - torch| <= VERIFY_TOLERANCE * max |torch| over every case.
VERIFY_TOLERANCE = 1e-4

log = logging.getLogger(__name__)


@dataclasses.dataclass
class VerificationCase:
    batch: int
    grid: tuple[int, int, int]
    timesteps: list[float]
    max_abs_error: float
    max_abs_reference: float

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / max(self.max_abs_reference, 1e-12)


@dataclasses.dataclass
class Verification:
    tolerance: float
    cases: list[VerificationCase]
    seconds: float

    @property
    def max_abs_error(self) -> float:
        return max(c.max_abs_error for c in self.cases)

    @property
    def max_relative_error(self) -> float:
        return max(c.relative_error for c in self.cases)

    @property
    def passed(self) -> bool:
        return self.max_relative_error <= self.tolerance

    def to_dict(self) -> dict:
        return {
            "tolerance": self.tolerance,
            "max_abs_error": self.max_abs_error,
            "max_relative_error": self.max_relative_error,
            "passed": self.passed,
            "seconds": round(self.seconds, 2),
            "cases": [dataclasses.asdict(c) | {"relative_error": c.relative_error} for c in self.cases],
        }


def export_onnx(model: ConditionalDenoiser, preset: Preset, path: Path) -> None:
    """Write the graph with dynamic batch and spatial axes (sides must be multiples of 2**(levels-1))."""
    grid = verification_grids(preset)[0]
    example = _random_inputs(preset, batch=2, grid=grid, timesteps=[1.0, 2.0], seed=0)
    batch = torch.export.Dim("batch", min=1, max=1024)
    spatial = {0: batch, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC, 4: torch.export.Dim.DYNAMIC}
    with warnings.catch_warnings():
        # torch's exporter warns that the inputs share the one batch axis (as meant), and about its own tree code
        warnings.filterwarnings("ignore", r"# The axis name: batch will not be used", UserWarning)
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        program = torch.onnx.export(
            model.eval(),
            tuple(example.values()),
            dynamo=True,
            opset_version=OPSET,
            input_names=list(INPUTS),
            output_names=[PREDICTED_NOISE],
            dynamic_shapes={NOISY_IMAGE: spatial, CONDITION: spatial, TIMESTEP: {0: batch}},
            verbose=False,
        )
    assert program is not None  # dynamo=True always returns the program (None is the legacy exporter's)
    graph = program.model_proto
    for value in [*graph.graph.input[:2], *graph.graph.output]:
        dims = value.type.tensor_type.shape.dim
        dims[0].dim_param = "batch"
        for dim, name in zip(dims[2:], SPATIAL_AXES):
            dim.dim_param = name
    graph.doc_string = f"Med-DDPM conditional denoiser, preset '{preset.name}'"
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def verification_grids(preset: Preset) -> list[tuple[int, int, int]]:
    """Small grids that still reach the deepest level twice: one cubic, one not."""
    side = max(16, 2 * preset.unet.downsample_factor)
    return [(side, side, side), (side, side, side + preset.unet.downsample_factor)]


def verify_onnx(path: Path, model: ConditionalDenoiser, preset: Preset) -> Verification:
    """Run the graph with ONNX Runtime on random inputs and compare with the PyTorch model."""
    started = time.monotonic()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    last = float(preset.schedule.timesteps - 1)
    grids = verification_grids(preset)
    plan = [(1, grids[0], [last]), (2, grids[1], [0.0, last / 2])]  # last / 2 is fractional
    cases = []
    for seed, (batch, grid, timesteps) in enumerate(plan):
        inputs = _random_inputs(preset, batch, grid, timesteps, seed)
        with torch.no_grad():
            reference = model(*inputs.values()).numpy()
        exported = session.run([PREDICTED_NOISE], {k: v.numpy() for k, v in inputs.items()})[0]
        cases.append(
            VerificationCase(
                batch, grid, timesteps, float(np.abs(exported - reference).max()), float(np.abs(reference).max())
            )
        )
    return Verification(VERIFY_TOLERANCE, cases, time.monotonic() - started)


def require_passed(verification: Verification, path: Path) -> None:
    if not verification.passed:
        raise ExportVerificationError(
            f"{path}: the ONNX graph differs from the PyTorch model: max relative error "
            f"{verification.max_relative_error:.2e} > tolerance {verification.tolerance:.0e} "
            f"(max abs error {verification.max_abs_error:.2e}); the export is not usable. Report this with "
            f"the torch and onnx versions in the manifest"
        )


def _random_inputs(
    preset: Preset, batch: int, grid: tuple[int, int, int], timesteps: list[float], seed: int
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, *grid)
    noisy = torch.randn(shape[:1] + (preset.out_channels,) + shape[1:], generator=generator)
    condition = torch.randint(0, 2, shape[:1] + (preset.condition_channels,) + shape[1:], generator=generator)
    condition = condition.float() * 2 - 1 if preset.condition.scale == ConditionScale.SYMMETRIC else condition.float()
    return dict(zip(INPUTS, (noisy, condition, torch.tensor(timesteps, dtype=torch.float32))))
