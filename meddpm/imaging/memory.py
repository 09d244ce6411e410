"""Will a run fit in this machine's memory? Estimates calibrated by measurement, and the checks.

One UNet step: the estimate counts the feature maps the UNet keeps alive for its skip connections (every input
block's output, at its level's resolution and width), scales them by a factor measured with ONNX Runtime on the CPU
(`python -m benchmarks.step_memory`, figures in docs/performance.md), and adds the weights and the process's baseline.

One mask: the app's process also holds the mask's volumes: every sample on the network grid and on the mask's grid
until written, and, one at a time, the intermediate volumes of mapping the labels onto the network grid, of mapping
a sample back (MONAI's trilinear resize, which smooths first where it shrinks an axis: the costly part, on the grid
the mask is resampled to) and of writing a volume (`python -m benchmarks.mask_memory` measures whole runs).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from meddpm.errors import ConfigurationError, InputError
from meddpm.imaging.formats import OutputFormat
from meddpm.imaging.geometry import ModelGrid, sizes_text
from meddpm.imaging.masks import MAX_SIDE, MAX_VOXELS
from meddpm.model.presets import Preset

# Fitted to peak RSS measured with ONNX Runtime 1.31 on a 2-core x86_64 CPU, whole-head preset at 32^3, 64^3
# and 96^3 (627, 1439, 3743 MiB): peak = BASELINE + weights + ACTIVATION_FACTOR x skip bytes x batch. It
# predicts 8177 MiB at 128^3, where 7953 MiB was measured.
BASELINE_BYTES = 340 * 2**20  # python, torch, ONNX Runtime
ACTIVATION_FACTOR = 6.5

# Fitted to peak RSS of the app's process (ONNX Runtime 1.31, MONAI 1.6, 2-core x86_64 CPU, demo model; see
# benchmarks/mask_memory.py): bytes per voxel of each intermediate volume, per image channel where it says so.
APP_MODULES_BYTES = 300 * 2**20  # holoscan, MONAI Deploy, DICOM libraries: the app's process beyond the step's
LABELS_TO_NETWORK_BYTES = 6  # per mask and resampled voxel: orientation copy, int16 and MONAI's nearest resize
IMAGE_FROM_NETWORK_BYTES = 16  # per resampled voxel and channel: the padded volume, its stack, MONAI's resize
SMOOTHING_BYTES = 40  # per smoothed voxel and channel: MONAI's anti-aliasing Gaussian (padded copies, convolutions)
SMOOTHING_BYTES_PER_TAP = 4  # the same on one torch thread, whose convolution unfolds the volume: per kernel tap
SMOOTHING_OVERHEAD_BYTES = 160 * 2**20
RESTORED_BYTES = 8  # per mask voxel and channel: the resized volume and its reoriented copy
WRITING_BYTES = {
    OutputFormat.NIFTI: 8,
    OutputFormat.DICOM: 32,
}  # per mask voxel: one volume written (DICOM: stored and rescaled copies)


def skip_bytes(preset: Preset, grid: tuple[int, int, int], batch: int = 1) -> int:
    """Bytes of the float32 feature maps the encoder hands to the decoder, for one step."""
    unet = preset.unet
    voxels = int(np.prod(grid))
    widths = [unet.model_channels * m for m in unet.channel_mult]
    total = unet.model_channels * voxels  # the input convolution's output
    for level, width in enumerate(widths):
        total += unet.num_res_blocks * width * voxels // 8**level
        if level + 1 < len(widths):  # the downsampled map that opens the next level
            total += width * voxels // 8 ** (level + 1)
    return 4 * batch * total


def step_memory_estimate(preset: Preset, grid: tuple[int, int, int], batch: int, weights_bytes: int) -> int:
    """Peak resident bytes of a process running one step of `batch` samples in process."""
    return int(BASELINE_BYTES + weights_bytes + ACTIVATION_FACTOR * skip_bytes(preset, grid, batch))


def mask_volumes_bytes(grid: ModelGrid, samples: int, formats: tuple[OutputFormat, ...]) -> int:
    """Peak bytes of one mask's volumes: the samples held until written, plus the largest intermediate volumes."""
    channels = grid.preset.out_channels
    source, resampled, network = (
        math.prod(shape) for shape in (grid.source_shape, grid.resampled_shape, grid.preset.image.grid)
    )
    held = 4 * channels * samples * (source + 2 * network)  # on the mask's grid, and twice on the network grid
    to_network = LABELS_TO_NETWORK_BYTES * (source + resampled)
    from_network = channels * (IMAGE_FROM_NETWORK_BYTES * resampled + RESTORED_BYTES * source)
    if grid.anti_aliased:
        from_network += channels * smoothing_bytes(grid) + SMOOTHING_OVERHEAD_BYTES
    writing = max(WRITING_BYTES[name] for name in formats) * source
    return held + max(to_network, from_network, writing)


def smoothing_bytes(grid: ModelGrid) -> int:
    """Bytes of MONAI's anti-aliasing Gaussian on one channel: sigma (shrink factor - 1) / 2 on the resampled grid,
    padded by 4 sigma a side; on one torch thread its cost grows with the kernel (2 x 4 sigma + 1 taps)."""
    tails = [int(4 * max(0.0, (r / c - 1) / 2) + 1) for r, c in zip(grid.resampled_shape, grid.canonical_shape)]
    padded = math.prod(r + 2 * tail for r, tail in zip(grid.resampled_shape, tails))
    if torch.get_num_threads() > 1:
        return SMOOTHING_BYTES * padded
    return SMOOTHING_BYTES_PER_TAP * (2 * max(tails) + 1) * padded


def mask_memory_estimate(
    grid: ModelGrid, samples: int, batch: int, weights_bytes: int | None, formats: tuple[OutputFormat, ...]
) -> int:
    """Peak resident bytes of the app synthesising `samples` samples of one mask and writing them in `formats`;
    `weights_bytes` None when the UNet runs on a server."""
    step = (
        BASELINE_BYTES
        if weights_bytes is None
        else step_memory_estimate(grid.preset, grid.preset.image.grid, batch, weights_bytes)
    )
    return step + APP_MODULES_BYTES + mask_volumes_bytes(grid, samples, formats)


def check_mask_fits(
    where: str, grid: ModelGrid, samples: int, batch: int, weights_bytes: int | None, formats: tuple[OutputFormat, ...]
) -> None:
    """Refuse, before its work starts, a mask whose grid at the preset's voxel size is beyond the size limits, or
    whose run would not fit in the memory this process has and can get (InputError naming what to change)."""
    described = (
        f"{sizes_text(grid.source_shape)} voxels of {sizes_text(grid.source_voxel_mm)} mm are "
        f"{sizes_text(grid.resampled_shape)} voxels at the model's "
        f"{sizes_text(grid.preset.image.voxel_size_mm)} mm"
    )
    if max(grid.resampled_shape) > MAX_SIDE or math.prod(grid.resampled_shape) > MAX_VOXELS:
        raise InputError(
            f"{where}: its {described}, beyond what is accepted (at most {MAX_SIDE} voxels a side and {MAX_VOXELS} in "
            f"all); if the voxel size in the header is wrong, correct it, else crop the mask to the head"
        )
    needed = mask_memory_estimate(grid, samples, batch, weights_bytes, formats)
    budget = available_bytes() + resident_bytes()
    if needed > budget:
        fewer = next(
            (
                n
                for n in range(samples - 1, 0, -1)
                if mask_memory_estimate(grid, n, min(batch, n), weights_bytes, formats) <= budget
            ),
            None,
        )
        advice = f"use --samples {fewer} (or fewer), " if fewer else ""
        raise InputError(
            f"{where}: {samples} sample(s) of this mask need about {needed / 2**30:.1f} GiB in this process "
            f"(its {described}; the volumes alone {mask_volumes_bytes(grid, samples, formats) / 2**30:.1f} GiB), but "
            f"{budget / 2**30:.1f} GiB is available to it; {advice}crop the mask to the head, correct its voxel size "
            f"if the header's is wrong, or free memory"
        )


def resident_bytes() -> int:
    """This process's resident memory (VmRSS): it counts towards what a run's estimate may use."""
    return _kib_field("/proc/self/status", "VmRSS")


def available_bytes() -> int:
    """Memory the kernel can give without swapping (MemAvailable)."""
    return _kib_field("/proc/meminfo", "MemAvailable")


def _kib_field(path: str, key: str) -> int:
    """A 'KEY: N kB' line of a /proc file, in bytes."""
    with open(path) as file:
        for line in file:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in {path}")


def check_fits(preset: Preset, batch: int, weights_bytes: int) -> None:
    """Refuse, before any work, an in-process run whose step cannot fit in the memory available."""
    needed = step_memory_estimate(preset, preset.image.grid, batch, weights_bytes)
    available = available_bytes()
    if needed > available:
        smaller = next(
            (
                b
                for b in range(batch - 1, 0, -1)
                if step_memory_estimate(preset, preset.image.grid, b, weights_bytes) <= available
            ),
            None,
        )
        advice = f"use --batch-size {smaller}, " if smaller else ""
        raise ConfigurationError(
            f"one step of preset '{preset.name}' at {'x'.join(map(str, preset.image.grid))} with batch {batch} needs "
            f"about {needed / 2**30:.1f} GiB in process, but {available / 2**30:.1f} GiB is available; {advice}free "
            f"memory, or run the UNet on a GPU server (--triton-server-netloc HOST:PORT)"
        )
