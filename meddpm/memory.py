"""Will one UNet step fit in this machine's memory? An estimate calibrated by measurement, and the check.

The estimate counts the feature maps the UNet keeps alive for its skip connections (every input block's output,
at its level's resolution and width), scales them by a factor measured with ONNX Runtime on the CPU
(`python -m benchmarks.step_memory`, figures in the README), and adds the weights and the process's baseline.
"""

from __future__ import annotations

import numpy as np

from meddpm.errors import ConfigurationError
from meddpm.presets import Preset

# Fitted to peak RSS measured with ONNX Runtime 1.31 on a 2-core x86_64 CPU, whole-head preset at 32^3, 64^3
# and 96^3 (627, 1439, 3743 MiB): peak = BASELINE + weights + ACTIVATION_FACTOR x skip bytes x batch. It
# predicts 8177 MiB at 128^3, where 7953 MiB was measured.
BASELINE_BYTES = 340 * 2**20  # python, torch, ONNX Runtime
ACTIVATION_FACTOR = 6.5


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


def available_bytes() -> int:
    """Memory the kernel can give without swapping (MemAvailable)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def check_fits(preset: Preset, batch: int, weights_bytes: int) -> None:
    """Refuse, before any work, an in-process run whose step cannot fit in the memory available."""
    needed = step_memory_estimate(preset, preset.image.grid, batch, weights_bytes)
    available = available_bytes()
    if needed > available:
        smaller = next((b for b in range(batch - 1, 0, -1)
                        if step_memory_estimate(preset, preset.image.grid, b, weights_bytes) <= available), None)
        advice = f"use --batch-size {smaller}, " if smaller else ""
        raise ConfigurationError(
            f"one step of preset '{preset.name}' at {'x'.join(map(str, preset.image.grid))} with batch {batch} needs "
            f"about {needed / 2**30:.1f} GiB in process, but {available / 2**30:.1f} GiB is available; {advice}free "
            f"memory, or run the UNet on a GPU server (--triton-server-netloc HOST:PORT)"
        )
