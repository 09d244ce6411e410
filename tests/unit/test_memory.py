"""The memory estimates (one UNet step in process; one mask's whole run), the limits that bind (free memory, the
cgroup, the address space), the output disk's room, and the checks that refuse what cannot fit."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from meddpm.errors import ConfigurationError, InputError, OutputError
from meddpm.imaging import memory
from meddpm.imaging.geometry import ModelGrid
from meddpm.model.presets import get_preset

WHOLE_HEAD = get_preset("whole-head")
WEIGHTS = 155 * 2**20  # the whole-head ONNX file


def test_activations_scale_with_voxels_and_batch():
    small = memory.skip_bytes(WHOLE_HEAD, (64, 64, 64))
    assert memory.skip_bytes(WHOLE_HEAD, (128, 128, 128)) == pytest.approx(8 * small, rel=1e-3)
    assert memory.skip_bytes(WHOLE_HEAD, (64, 64, 64), batch=3) == 3 * small


@pytest.mark.parametrize(
    "runtime, measured",
    [("onnxruntime", {64: 1439, 96: 3743, 128: 7953}), ("openvino", {32: 745, 64: 1146, 96: 2239})],
)
def test_estimate_follows_the_measured_peaks(runtime, measured):
    """Peaks measured by benchmarks/step_memory.py (2-core CPU), within 10%; ONNX Runtime's 128^3 and OpenVINO's
    96^3 were not fitted."""
    for side, measured_mib in measured.items():
        estimate = memory.step_memory_estimate(WHOLE_HEAD, (side,) * 3, 1, WEIGHTS, runtime) / 2**20
        assert estimate == pytest.approx(measured_mib, rel=0.10), side


def test_openvino_is_estimated_at_what_it_takes_not_at_onnx_runtimes_peak():
    """At 96^3 OpenVINO's step peaked at 2239 MiB, ONNX Runtime's at 3698 MiB (the same CPU)."""
    ratio = memory.step_memory_estimate(WHOLE_HEAD, (96,) * 3, 1, WEIGHTS, "openvino") / memory.step_memory_estimate(
        WHOLE_HEAD, (96,) * 3, 1, WEIGHTS, "onnxruntime"
    )
    assert ratio == pytest.approx(2239 / 3698, rel=0.05)


@pytest.mark.parametrize(
    ("runtime", "measured_mib"), [("openvino", 4784), ("openvino-bf16", 3210), ("openvino-mixed", 7111)]
)
def test_the_app_at_full_size_is_estimated_at_or_above_its_peak(runtime, measured_mib):
    """The app's highest peaks at 128^3 in two runs (benchmarks/full_size.py, the Med-DDPM sample mask, 2-core CPU):
    BF16 holds less than FP32, mixed both compiled graphs; the per-mask estimate covers each, within 10% above."""
    mask = ModelGrid((128, 128, 128), np.diag([1.5, 1.5, 1.5, 1.0]), WHOLE_HEAD)
    estimate = memory.mask_memory_estimate(mask, 1, 1, WEIGHTS, ("nifti",), runtime) / 2**20
    assert measured_mib <= estimate <= 1.10 * measured_mib


def room(limit: str, size: int) -> memory.MemoryRoom:
    return memory.MemoryRoom(limit, size, "free memory")


def test_check_suggests_a_batch_that_fits(monkeypatch):
    one = memory.step_memory_estimate(WHOLE_HEAD, WHOLE_HEAD.image.grid, 1, WEIGHTS, "onnxruntime")
    two = memory.step_memory_estimate(WHOLE_HEAD, WHOLE_HEAD.image.grid, 2, WEIGHTS, "onnxruntime")
    monkeypatch.setattr(memory, "memory_room", lambda: room("the free memory", (one + two) // 2))
    memory.check_fits(WHOLE_HEAD, 1, WEIGHTS, "onnxruntime")
    with pytest.raises(ConfigurationError, match="with batch 4 needs about .* use --batch-size 1,"):
        memory.check_fits(WHOLE_HEAD, 4, WEIGHTS, "onnxruntime")
    monkeypatch.setattr(memory, "memory_room", lambda: room("the free memory", one // 2))
    with pytest.raises(ConfigurationError, match="allows it .* GiB; free memory, or run the UNet on a GPU server"):
        memory.check_fits(WHOLE_HEAD, 1, WEIGHTS, "onnxruntime")


# --- one mask: its volumes, on the grid it is resampled to, beside the step ------------------------------------

DEMO = get_preset("demo")
DEMO_WEIGHTS = 3_572_642  # the demo model's ONNX file
NIFTI, BOTH = ("nifti",), ("nifti", "dicom")
# Peak RSS of the app synthesising one mask (python -m benchmarks.mask_memory: demo model in process, DDIM 2 steps,
# ONNX Runtime 1.31, MONAI 1.6, 2-core CPU, 2026-12-01): (mask side, voxel mm, samples, output formats, torch
# threads, MiB). One torch thread (OMP_NUM_THREADS=1) makes MONAI's smoothing cost more, the more it smooths.
MEASURED_RUNS = [
    (32, 6.0, 1, NIFTI, 2, 658),  # the network grid itself
    (128, 1.5, 1, NIFTI, 2, 681),
    (256, 0.75, 1, NIFTI, 2, 807),
    (256, 0.75, 8, NIFTI, 2, 1255),
    (256, 0.75, 30, NIFTI, 2, 2670),  # 30 samples held on the mask's grid
    (32, 24.0, 1, NIFTI, 2, 840),  # resampled to 128^3, smoothed on the way back
    (32, 48.0, 1, NIFTI, 2, 1740),  # resampled to 256^3
    (24, 64.0, 1, NIFTI, 2, 1808),  # resampled to 256^3, more smoothing
    (256, 0.75, 1, BOTH, 2, 1096),
    (256, 0.75, 4, BOTH, 2, 1289),
    (32, 48.0, 1, BOTH, 2, 1740),
    (32, 24.0, 1, NIFTI, 1, 839),
    (32, 48.0, 1, NIFTI, 1, 3388),
]


def demo_grid(side: int, voxel_mm: float) -> ModelGrid:
    return ModelGrid((side,) * 3, np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0]), DEMO)


@pytest.mark.parametrize("side, voxel_mm, samples, formats, threads, measured_mib", MEASURED_RUNS)
def test_mask_estimate_follows_the_measured_peaks(monkeypatch, side, voxel_mm, samples, formats, threads, measured_mib):
    """Never below a measured peak, and at most 25% above it."""
    monkeypatch.setattr(memory.torch, "get_num_threads", lambda: threads)
    estimate = (
        memory.mask_memory_estimate(demo_grid(side, voxel_mm), samples, 1, DEMO_WEIGHTS, formats, "onnxruntime") / 2**20
    )
    assert measured_mib <= estimate <= 1.25 * measured_mib


def test_a_mask_too_large_at_the_models_voxel_size_is_refused():
    """32 voxels of 100 mm are 533 a side at 6 mm: the limits hold on that grid, not only on the file's."""
    with pytest.raises(
        InputError,
        match=r"m.nii: its 32x32x32 voxels of 100x100x100 mm are 533x533x533 voxels at "
        r"the model's 6x6x6 mm, beyond what is accepted \(at most 1024 voxels a side "
        r"and 134217728 in all\); if the voxel size in the header is wrong",
    ):
        memory.check_mask_fits("m.nii", demo_grid(32, 100.0), 1, 1, DEMO_WEIGHTS, ("nifti",), "onnxruntime")


def test_a_mask_run_that_cannot_fit_is_refused_naming_the_samples_that_fit(monkeypatch):
    grid = demo_grid(256, 0.75)
    ten = memory.mask_memory_estimate(grid, 10, 1, DEMO_WEIGHTS, ("nifti",), "onnxruntime")
    monkeypatch.setattr(memory, "memory_room", lambda: room("the free memory", ten))
    memory.check_mask_fits("m.nii", grid, 10, 1, DEMO_WEIGHTS, ("nifti",), "onnxruntime")
    with pytest.raises(
        InputError,
        match=r"m.nii: 30 sample\(s\) of this mask need about 2.7 GiB in this process "
        r"\(its 256x256x256 voxels of 0.75x0.75x0.75 mm are 32x32x32 voxels at the "
        r"model's 6x6x6 mm; the volumes alone 2.0 GiB\), but the free memory allows it 1.\d GiB; "
        r"use --samples 10 \(or fewer\), crop the mask",
    ):
        memory.check_mask_fits("m.nii", grid, 30, 1, DEMO_WEIGHTS, ("nifti",), "onnxruntime")
    monkeypatch.setattr(memory, "memory_room", lambda: room("the free memory", 0))
    with pytest.raises(InputError, match="allows it 0.0 GiB; crop the mask to the head"):
        memory.check_mask_fits("m.nii", grid, 1, 1, DEMO_WEIGHTS, ("nifti",), "onnxruntime")


def test_a_unet_on_a_server_costs_this_process_no_step():
    grid = demo_grid(32, 6.0)
    in_process = memory.mask_memory_estimate(grid, 1, 1, DEMO_WEIGHTS, ("nifti",), "onnxruntime")
    served = memory.mask_memory_estimate(grid, 1, 1, None, ("nifti",), None)
    step = memory.step_memory_estimate(DEMO, DEMO.image.grid, 1, DEMO_WEIGHTS, "onnxruntime")
    assert in_process - served == step - memory.SERVED_BASELINE_BYTES


# --- the limits, read from /proc and /sys files (here fakes in tmp_path, then the real ones) --------------------

GIB = 2**30


def write_files(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def test_a_cgroup_v2_limit_leaves_its_limit_less_what_its_group_uses_but_cannot_reclaim(tmp_path):
    """A Kubernetes pod's container (4 GiB) inside its pod's group (6 GiB): the tighter room binds."""
    write_files(
        tmp_path,
        {
            "proc_cgroup": "0::/kubepods/pod1/container\n",
            "sys/kubepods/memory.max": "max\n",
            "sys/kubepods/memory.current": str(9 * GIB),
            "sys/kubepods/memory.stat": "anon 1\ninactive_file 0\n",
            "sys/kubepods/pod1/memory.max": str(6 * GIB),
            "sys/kubepods/pod1/memory.current": str(3 * GIB),
            "sys/kubepods/pod1/memory.stat": "inactive_file 0\n",
            "sys/kubepods/pod1/container/memory.max": str(4 * GIB),
            "sys/kubepods/pod1/container/memory.current": str(2 * GIB),
            "sys/kubepods/pod1/container/memory.stat": f"anon {GIB}\ninactive_file {GIB // 2}\n",
        },
    )
    assert memory.cgroup_room(tmp_path / "proc_cgroup", tmp_path / "sys") == 2 * GIB + GIB // 2
    (tmp_path / "sys/kubepods/pod1/memory.current").write_text(str(5 * GIB))  # the pod's other containers grew
    assert memory.cgroup_room(tmp_path / "proc_cgroup", tmp_path / "sys") == GIB


def test_a_cgroup_v1_limit_and_a_containers_own_group_mounted_as_the_root(tmp_path):
    """Docker without a cgroup namespace: /proc/self/cgroup names /docker/ID, but /sys/fs/cgroup/memory is the
    container's own group."""
    write_files(
        tmp_path,
        {
            "proc_cgroup": "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n",
            "sys/memory/memory.limit_in_bytes": str(6 * GIB),
            "sys/memory/memory.usage_in_bytes": str(GIB),
            "sys/memory/memory.stat": "cache 0\ntotal_inactive_file 0\n",
        },
    )
    assert memory.cgroup_room(tmp_path / "proc_cgroup", tmp_path / "sys") == 5 * GIB
    (tmp_path / "sys/memory/memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert memory.cgroup_room(tmp_path / "proc_cgroup", tmp_path / "sys") is None
    (tmp_path / "proc_cgroup").write_text("0::/\n")  # v2 at the root: no memory.max there
    assert memory.cgroup_room(tmp_path / "proc_cgroup", tmp_path / "sys") is None


def test_an_address_space_limit_counts_what_is_mapped_beyond_what_is_resident(tmp_path):
    (tmp_path / "status").write_text("VmPeak:\t 3000000 kB\nVmSize:\t 2097152 kB\nVmRSS:\t 524288 kB\n")
    room = memory.address_space_room(tmp_path / "status", limit=6 * GIB)
    resident, mapped = GIB // 2, 2 * GIB
    assert room == resident + int((6 * GIB - mapped - memory.VIRTUAL_MARGIN_BYTES) / memory.VIRTUAL_PER_RESIDENT)
    assert memory.address_space_room(tmp_path / "status", limit=GIB) == resident  # no room to grow


CHECK_WHOLE_HEAD = textwrap.dedent(
    """
    from meddpm.errors import ConfigurationError
    from meddpm.imaging import memory
    from meddpm.model.presets import get_preset

    memory.check_fits(get_preset("demo"), 1, 3_572_642, "openvino")
    try:
        memory.check_fits(get_preset("whole-head"), 1, 155 * 2**20, "openvino")
    except ConfigurationError as error:
        print(error)
    """
)


def run_check(preexec_fn) -> str:
    """The check of a whole-head step (about 4.4 GiB with OpenVINO) in a fresh process: the demo's step fits."""
    result = subprocess.run(
        [sys.executable, "-c", CHECK_WHOLE_HEAD], preexec_fn=preexec_fn, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_process_under_an_address_space_limit_is_refused_naming_it():
    """RLIMIT_AS of 3 GiB (ulimit -v), far below the free memory: the whole-head step is refused."""
    output = run_check(lambda: resource.setrlimit(resource.RLIMIT_AS, (3 * GIB, 3 * GIB)))
    assert "needs about 4.4 GiB in process (openvino), but the address-space limit (ulimit -v) allows it" in output
    assert "; raise or lift `ulimit -v`, or run the UNet on a GPU server" in output


def test_a_process_in_a_cgroup_with_a_memory_limit_is_refused_naming_it():
    """A real cgroup (v1 or v2, under this process's own) limited to 2 GiB."""
    folder, _, (limit_file, _, _) = next(
        group
        for group in memory.memory_cgroups(Path("/proc/self/cgroup"), Path("/sys/fs/cgroup"))
        if (group[0] / group[2][0]).exists()
    )
    child = folder / f"meddpm-test-{os.getpid()}"
    child.mkdir()
    try:
        (child / limit_file).write_text(str(2 * GIB))
        output = run_check(lambda: (child / "cgroup.procs").write_text(str(os.getpid())))
    finally:
        child.rmdir()
    assert "needs about 4.4 GiB in process (openvino), but the container's memory limit (cgroup) allows it" in output
    assert "; raise the container's memory limit (e.g. resources.limits.memory), or run the UNet" in output


# --- the output disk ---------------------------------------------------------------------------------------------


def test_output_bound_covers_what_a_mask_wrote():
    """The demo's 32^3 mask, one sample, NIfTI: 108373 + 11490 + 2490 bytes written (sample, preview, record)."""
    assert memory.output_bytes((32, 32, 32), 1, 1, ("nifti",)) >= 108373 + 11490 + 2490
    nifti = memory.output_bytes((256, 256, 200), 1, 4, ("nifti",))
    both = memory.output_bytes((256, 256, 200), 1, 4, ("nifti", "dicom"))
    assert nifti == pytest.approx(4 * 4 * 256 * 256 * 200, rel=0.05)
    assert 4 * 2 * 256 * 256 * 200 < both - nifti < 1.2 * 4 * 2 * 256 * 256 * 200  # 16 bits, and a header a slice


def test_a_mask_whose_outputs_exceed_the_free_space_is_refused(tmp_path):
    memory.check_output_room(tmp_path)
    grid = demo_grid(512, 0.375)
    memory.check_mask_output_fits("m.nii", tmp_path, grid, 1, ("nifti",))
    samples = memory.free_disk_bytes(tmp_path) // (4 * 512**3) + 2
    with pytest.raises(
        OutputError,
        match=rf"m.nii: its outputs \({samples} sample\(s\) of 512x512x512 voxels as nifti\) may take up to .* MiB, "
        rf"but {tmp_path}'s file system has .* [KM]iB free; free space, choose another output folder",
    ):
        memory.check_mask_output_fits("m.nii", tmp_path, grid, samples, ("nifti",))
