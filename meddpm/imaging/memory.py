"""Will a run fit in the memory this process may use, and its outputs on the output disk? Estimates calibrated by
measurement, the limits that bind, and the checks.

One UNet step: the estimate counts the feature maps the UNet keeps alive for its skip connections (every input
block's output, at its level's resolution and width), scales them by a factor measured per runtime on the CPU
(`python -m benchmarks.step_memory`, figures in docs/performance.md), and adds the weights and the process's baseline.

One mask: the app's process also holds the mask's volumes: every sample on the network grid and on the mask's grid
until written, and, one at a time, the intermediate volumes of mapping the labels onto the network grid, of mapping
a sample back (MONAI's trilinear resize, which smooths first where it shrinks an axis: the costly part, on the grid
the mask is resampled to) and of writing a volume (`python -m benchmarks.mask_memory` measures whole runs).

The memory a process may use is the tightest of: the memory the kernel can give (MemAvailable), its cgroup's limit
(a container's: `memory.max` or `memory.limit_in_bytes`, less what the group uses), and its address-space limit
(`ulimit -v`, RLIMIT_AS), which counts virtual memory: the runtimes map far more than they touch.

One mask's outputs: an upper bound of what it writes, checked against the output file system's free space before
the mask is sampled; the run is refused at once where not even the smallest mask's outputs would fit.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
from pathlib import Path

import numpy as np
import torch

from meddpm.errors import ConfigurationError, InputError, OutputError
from meddpm.imaging.formats import OutputFormat
from meddpm.imaging.geometry import ModelGrid, sizes_text
from meddpm.imaging.masks import MAX_SIDE, MAX_VOXELS
from meddpm.model.presets import Preset

# peak = BASELINE + weights + ACTIVATION_FACTOR x skip bytes x batch, per runtime, fitted on a 2-core x86_64 CPU
# (AMD EPYC, AVX2, AVX512-BF16), whole-head preset. ONNX Runtime 1.31: fitted at 32^3, 64^3 and 96^3 (627, 1439,
# 3743 MiB); it predicts 8177 MiB at 128^3, where 7953 MiB was measured. OpenVINO 2026.4, which holds the weights
# twice (the model read and the model compiled): fitted at 32^3 and 64^3 (745, 1146 MiB) and raised to cover the
# app's highest peak at 128^3 (4784 and 4779 MiB in two runs, benchmarks/full_size.py): it estimates 4841 MiB
# there, and 2284 MiB at 96^3, where 2239 MiB was measured (ONNX Runtime: 3698 MiB). OpenVINO at BF16 holds the
# FP32 model read and a compiled BF16 copy (1.5 copies) and needs fewer activation bytes; mixed holds both
# compiled graphs, each with its own buffers: fitted at 128^3 to 3% above the highest of two runs' peaks (BF16
# 2913 and 3210 MiB; mixed 6811 and 7111 MiB).
BASELINE_BYTES = {"onnxruntime": 340 * 2**20, "openvino": 380 * 2**20}  # python, torch, the runtime
BASELINE_BYTES |= {"openvino-bf16": BASELINE_BYTES["openvino"], "openvino-mixed": BASELINE_BYTES["openvino"]}
WEIGHT_COPIES = {"onnxruntime": 1, "openvino": 2, "openvino-bf16": 1.5, "openvino-mixed": 2.5}
ACTIVATION_FACTOR = {"onnxruntime": 6.5, "openvino": 3.2, "openvino-bf16": 1.96, "openvino-mixed": 5.22}
# Python, torch and the Triton client, when the UNet runs on a server: the app peaked at 743-777 MiB with the
# whole-head model served, at 32^3 and 128^3 alike (benchmarks/full_size.py), 80 MiB above what 340 MiB gave.
SERVED_BASELINE_BYTES = 420 * 2**20
# An address-space limit counts virtual memory: the runtimes reserve more than they touch. Measured beside the
# peaks above, the virtual size grew by up to 1.5 bytes per resident byte (VmPeak against VmHWM, both runtimes);
# the margin covers what a runtime maps on its first step (threads, plugins: ~150 MiB for OpenVINO in the app) and
# kept the app's runs of benchmarks/mask_memory.py within the bound (OpenVINO's closest: 256^3, 8 samples).
VIRTUAL_PER_RESIDENT = 1.5
VIRTUAL_MARGIN_BYTES = 512 * 2**20

# Fitted to peak RSS of the app's process (ONNX Runtime 1.31, MONAI 1.6, 2-core x86_64 CPU, demo model; see
# benchmarks/mask_memory.py): bytes per voxel of each intermediate volume, per image channel where it says so.
APP_MODULES_BYTES = 300 * 2**20  # holoscan, MONAI Deploy, DICOM libraries: the app's process beyond the step's
LABELS_TO_NETWORK_BYTES = 6  # per mask and resampled voxel: orientation copy, int16 and MONAI's nearest resize
IMAGE_FROM_NETWORK_BYTES = 16  # per resampled voxel and channel: the padded volume, its stack, MONAI's resize
SMOOTHING_BYTES = 40  # per smoothed voxel and channel: MONAI's anti-aliasing Gaussian (padded copies, convolutions)
SMOOTHING_BYTES_PER_TAP = 4  # the same on one torch thread, whose convolution unfolds the volume: per kernel tap
SMOOTHING_OVERHEAD_BYTES = 160 * 2**20
# OpenVINO's peak in the app varies with how its threads were scheduled: at 32^3 (benchmarks/mask_memory.py, 12 mm
# voxels, 2 samples) it peaked at 784-788 MiB in six runs, quiet or beside a training run, and at 892 MiB once, in a
# CI run beside a training run; the margin covers that, and keeps the 128^3 peaks above within 7%.
RUNTIME_MARGIN_BYTES = {"openvino": 128 * 2**20, "openvino-bf16": 128 * 2**20, "openvino-mixed": 128 * 2**20}
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


def step_memory_estimate(
    preset: Preset, grid: tuple[int, int, int], batch: int, weights_bytes: int, runtime: str
) -> int:
    """Peak resident bytes of a process running one step of `batch` samples in process with `runtime`
    ("onnxruntime" or "openvino")."""
    weights = WEIGHT_COPIES[runtime] * weights_bytes
    return int(BASELINE_BYTES[runtime] + weights + ACTIVATION_FACTOR[runtime] * skip_bytes(preset, grid, batch))


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
    grid: ModelGrid,
    samples: int,
    batch: int,
    weights_bytes: int | None,
    formats: tuple[OutputFormat, ...],
    runtime: str | None,
) -> int:
    """Peak resident bytes of the app synthesising `samples` samples of one mask and writing them in `formats`;
    `weights_bytes` and `runtime` None when the UNet runs on a server."""
    step = (
        SERVED_BASELINE_BYTES
        if weights_bytes is None or runtime is None
        else step_memory_estimate(grid.preset, grid.preset.image.grid, batch, weights_bytes, runtime)
        + RUNTIME_MARGIN_BYTES.get(runtime, 0)
    )
    return step + APP_MODULES_BYTES + mask_volumes_bytes(grid, samples, formats)


def check_mask_fits(
    where: str,
    grid: ModelGrid,
    samples: int,
    batch: int,
    weights_bytes: int | None,
    formats: tuple[OutputFormat, ...],
    runtime: str | None,
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
    needed = mask_memory_estimate(grid, samples, batch, weights_bytes, formats, runtime)
    room = memory_room()
    if needed > room.bytes:
        fewer = next(
            (
                n
                for n in range(samples - 1, 0, -1)
                if mask_memory_estimate(grid, n, min(batch, n), weights_bytes, formats, runtime) <= room.bytes
            ),
            None,
        )
        advice = f"use --samples {fewer} (or fewer), " if fewer else ""
        raise InputError(
            f"{where}: {samples} sample(s) of this mask need about {needed / 2**30:.1f} GiB in this process "
            f"(its {described}; the volumes alone {mask_volumes_bytes(grid, samples, formats) / 2**30:.1f} GiB), but "
            f"{room}; {advice}crop the mask to the head, correct its voxel size if the header's is wrong, or "
            f"{room.remedy}"
        )


def check_fits(preset: Preset, batch: int, weights_bytes: int, runtime: str) -> None:
    """Refuse, before any work, an in-process run whose step cannot fit in the memory this process may use."""
    needed = step_memory_estimate(preset, preset.image.grid, batch, weights_bytes, runtime)
    room = memory_room()
    if needed > room.bytes:
        smaller = next(
            (
                b
                for b in range(batch - 1, 0, -1)
                if step_memory_estimate(preset, preset.image.grid, b, weights_bytes, runtime) <= room.bytes
            ),
            None,
        )
        advice = f"use --batch-size {smaller}, " if smaller else ""
        raise ConfigurationError(
            f"one step of preset '{preset.name}' at {'x'.join(map(str, preset.image.grid))} with batch {batch} needs "
            f"about {needed / 2**30:.1f} GiB in process ({runtime}), but {room}; {advice}{room.remedy}, or run "
            f"the UNet on a GPU server (--triton-server-netloc HOST:PORT)"
        )


# --- the limits: each says how much this process's resident memory may reach, counting what it holds now ------


@dataclasses.dataclass(frozen=True)
class MemoryRoom:
    """The most this process's resident memory may reach under one limit, and how to raise that limit."""

    limit: str
    bytes: int
    remedy: str

    def __str__(self) -> str:
        return f"{self.limit} allows it {self.bytes / 2**30:.1f} GiB"


def memory_room() -> MemoryRoom:
    """The tightest of the limits on this process's memory."""
    resident = resident_bytes()
    rooms = [MemoryRoom("the memory free on this machine (MemAvailable)", available_bytes() + resident, "free memory")]
    cgroup = cgroup_room()
    if cgroup is not None:
        remedy = "raise the container's memory limit (e.g. resources.limits.memory)"
        rooms.append(MemoryRoom("the container's memory limit (cgroup)", cgroup + resident, remedy))
    address_space = address_space_room()
    if address_space is not None:
        rooms.append(MemoryRoom("the address-space limit (ulimit -v)", address_space, "raise or lift `ulimit -v`"))
    return min(rooms, key=lambda room: room.bytes)


def resident_bytes(status: Path = Path("/proc/self/status")) -> int:
    """This process's resident memory (VmRSS): it counts towards what a run's estimate may use."""
    return _kib_field(status, "VmRSS")


def available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """Memory the kernel can give without swapping (MemAvailable)."""
    return _kib_field(meminfo, "MemAvailable")


def cgroup_room(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What this process's cgroup and its ancestors leave before their memory limit (limit - usage, less the
    reclaimable inactive file cache), the tightest; None without a limit."""
    rooms = []
    for folder, base, files in memory_cgroups(proc_cgroup, root):
        groups = [folder, *(parent for parent in folder.parents if parent.is_relative_to(base))]
        rooms += [room for room in (_group_room(group, *files) for group in groups) if room is not None]
    return min(rooms, default=None)


def memory_cgroups(proc_cgroup: Path, root: Path) -> list[tuple[Path, Path, tuple[str, str, str]]]:
    """This process's cgroup folders that may limit memory, each with its hierarchy's root and the names of its
    limit, usage and inactive file cache: cgroup v2 (`0::PATH`: memory.max, memory.current) and v1 (the memory
    controller: memory.limit_in_bytes, memory.usage_in_bytes)."""
    groups = []
    for line in proc_cgroup.read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, files = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        folder = base / path.lstrip("/")
        if not folder.is_dir():  # a container's own group mounted as the root (a cgroup namespace, or a bind mount)
            folder = base
        groups.append((folder, base, files))
    return groups


def _group_room(folder: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    """limit - (usage - inactive file cache) of one group; None where it sets no limit."""
    try:
        limit = (folder / limit_file).read_text().strip()
        usage = int((folder / usage_file).read_text())
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
    except (OSError, ValueError):
        return None
    if limit == "max" or int(limit) >= 2**62:  # v1 writes "no limit" as the largest page-aligned number
        return None
    return max(0, int(limit) - usage + int(stat.get(inactive_key, 0)))


def address_space_room(status: Path = Path("/proc/self/status"), limit: int | None = None) -> int | None:
    """How far this process's resident memory may grow under its address-space limit (RLIMIT_AS, or `limit` in
    bytes): what it holds now, plus the room left in the limit (less a margin for what a runtime maps on its first
    step) over the virtual bytes each new resident byte brings; None without a limit."""
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return None
    virtual, resident = _kib_field(status, "VmSize"), _kib_field(status, "VmRSS")
    return resident + max(0, int((limit - virtual - VIRTUAL_MARGIN_BYTES) / VIRTUAL_PER_RESIDENT))


# --- the outputs: one mask's, at most, against the output file system's free space -------------------------------

# A synthetic image's float32 NIfTI barely compresses (a 32^3 sample: 106 of 128 KiB); DICOM stores 16 bits a voxel
# and a header per slice; each file rounds up to the file system's blocks.
NIFTI_BYTES_PER_VOXEL = 4
DICOM_BYTES_PER_VOXEL = 2
FILE_BYTES = 16 * 2**10  # a file's header, gzip's framing, its last block
PREVIEW_AND_RECORD_BYTES = 2**20  # measured 14 KiB; the preview's panels are ~192 pixels whatever the mask's size
LEAST_OUTPUT_BYTES = 16 * 2**10  # the smallest mask's outputs: record.json, preview.png, a volume: a 4 KiB block each


def output_bytes(shape: tuple[int, ...], channels: int, samples: int, formats: tuple[OutputFormat, ...]) -> int:
    """At most the bytes one mask of `shape` writes: `samples` x `channels` volumes in each format, its preview and
    its record."""
    voxels = math.prod(shape)
    volume = 0
    if OutputFormat.NIFTI in formats:
        volume += NIFTI_BYTES_PER_VOXEL * voxels + FILE_BYTES
    if OutputFormat.DICOM in formats:
        volume += DICOM_BYTES_PER_VOXEL * voxels + FILE_BYTES * max(shape)  # at most one file per slice
    return samples * channels * volume + PREVIEW_AND_RECORD_BYTES


def free_disk_bytes(folder: Path) -> int:
    """What an unprivileged writer may still write on `folder`'s file system."""
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def check_output_room(folder: Path) -> None:
    """Refuse, before any work, an output folder whose file system cannot hold even the smallest mask's outputs."""
    free = free_disk_bytes(folder)
    if free < LEAST_OUTPUT_BYTES:
        raise OutputError(
            f"{folder}: its file system has {_size_text(free)} free, less than any mask's outputs need (at least "
            f"{_size_text(LEAST_OUTPUT_BYTES)}); free space, or choose another output folder (-o, "
            f"HOLOSCAN_OUTPUT_PATH)"
        )


def check_mask_output_fits(
    where: str, folder: Path, grid: ModelGrid, samples: int, formats: tuple[OutputFormat, ...]
) -> None:
    """Refuse, before it is sampled, a mask whose outputs may not fit on the output file system (OutputError)."""
    needed = output_bytes(grid.source_shape, grid.preset.out_channels, samples, formats)
    free = free_disk_bytes(folder)
    if needed > free:
        raise OutputError(
            f"{where}: its outputs ({samples} sample(s) of {sizes_text(grid.source_shape)} voxels as "
            f"{','.join(formats)}) may take up to {_size_text(needed)}, but {folder}'s file system has "
            f"{_size_text(free)} free; free space, choose another output folder (-o, HOLOSCAN_OUTPUT_PATH), or use "
            f"fewer --samples"
        )


def _size_text(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size // 2**10} KiB"


def _kib_field(path: Path, key: str) -> int:
    """A 'KEY: N kB' line of a /proc file, in bytes."""
    with open(path) as file:
        for line in file:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in {path}")
