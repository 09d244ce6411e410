"""The application end to end: `python -m app` on phantom masks with the committed demo model."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from meddpm.backends.openvino_denoiser import native_bf16
from meddpm.imaging.phantom_heads import BRAIN, TUMOUR, dice, make_phantom, segment
from meddpm.model.manifest import sha256_of
from tests.conftest import edit_weights
from tests.helpers import PATIENT, concurrently, imported_modules, run_app, write_mask
from tests.model_samples import copy_repository

pytestmark = pytest.mark.slow
# What `auto` runs the demo model with here: its gated mixed precision where the CPU has native BF16.
AUTO_BACKEND = "openvino (mixed)" if native_bf16() else "openvino (fp32)"
MIXED_MEAN_DIFFERENCE = 0.01  # of the model range [-1, 1]: BF16 at low noise; measured 0.0018 (max 0.013)


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    """A native-grid phantom, a finer LPS phantom (resampled and reoriented), and a bad mask."""
    folder = tmp_path_factory.mktemp("masks")
    rng = np.random.default_rng(12)
    native, _ = make_phantom(rng, (32, 32, 32), 6.0)
    write_mask(folder / "native.nii.gz", native, np.diag([6.0, 6.0, 6.0, 1.0]))
    fine, _ = make_phantom(rng, (48, 48, 48), 4.0)
    lps = np.diag([-4.0, -4.0, 4.0, 1.0])
    lps[:3, 3] = [90.0, 100.0, -80.0]
    write_mask(folder / "fine_lps.nii", fine[::-1, ::-1].copy(), lps)
    bad = native.copy()
    bad[0, 0, 0] = 7
    write_mask(folder / "bad_label.nii.gz", bad, np.eye(4))
    return folder


def test_each_mask_is_synthesised_on_its_own_grid_and_a_bad_one_is_reported(demo_repository, masks, tmp_path):
    out = tmp_path / "out"
    result = run_app(
        "-i",
        masks,
        "-o",
        out,
        "-m",
        demo_repository,
        "--scheduler",
        "ddim",
        "--steps",
        "10",
        "--seed",
        "5",
        "--samples",
        "2",
        "--batch-size",
        "2",
    )
    assert result.returncode == 1, result.stderr  # one mask failed, the others were written
    assert "2 mask(s) synthesised, 1 failed" in result.stdout
    assert "FAILED bad_label" in result.stdout and "label values [7]" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["fine_lps", "native"]  # nothing half-written left behind

    for name, source in (("native", "native.nii.gz"), ("fine_lps", "fine_lps.nii")):
        mask_image = nib.load(masks / source)
        folder = out / name
        assert sorted(p.name for p in folder.iterdir()) == [
            ".meddpm-output.json",
            "preview.png",
            "record.json",
            "sample_0.nii.gz",
            "sample_1.nii.gz",
        ]
        for sample in ("sample_0.nii.gz", "sample_1.nii.gz"):
            synthetic = nib.load(folder / sample)
            assert synthetic.shape == mask_image.shape
            np.testing.assert_allclose(synthetic.affine, mask_image.affine, atol=1e-5)
            data = synthetic.get_fdata()
            assert -1.0 <= data.min() and data.max() <= 1.0 and data.std() > 0.05
        assert not np.array_equal(
            nib.load(folder / "sample_0.nii.gz").get_fdata(), nib.load(folder / "sample_1.nii.gz").get_fdata()
        )
        record = json.loads((folder / "record.json").read_text())
        assert record["scheduler"] == "ddim" and record["steps"] == 10 and record["seeds"] == [5, 6]
        assert record["model"]["preset"]["name"] == "demo" and record["model"]["verification_passed"]
        graph = demo_repository / "meddpm_demo" / "1" / "model.onnx"  # the hash of the file that ran
        assert record["model"]["sha256_verified"] == {str(graph): sha256_of(graph)}
        assert record["backend"] == AUTO_BACKEND and record["timings_s"]["per_step"] > 0
        assert record["grid"]["exact"] == (name == "native")
        assert Image.open(folder / "preview.png").size[1] == 2 * 192


def test_masks_that_would_give_meaningless_images_or_exhaust_memory_are_refused(demo_repository, tmp_path):
    """Each refused before sampling, naming the file, why and the fix; the mask that fits is still written, and
    what its crop cost is warned and recorded."""
    folder = tmp_path / "masks"
    folder.mkdir()
    head, _ = make_phantom(np.random.default_rng(0), (32, 32, 32), 6.0)
    six_mm = np.diag([6.0, 6.0, 6.0, 1.0])
    high = np.zeros((32, 32, 40), np.uint8)
    high[:, :, 13:] = head[:, :, :27]  # the top of the head beyond the field of view's top
    write_mask(folder / "high.nii.gz", high, six_mm)
    corner = np.zeros((64, 64, 64), np.uint8)
    corner[32:, 32:, 32:] = head
    write_mask(folder / "corner.nii.gz", corner, six_mm)
    write_mask(folder / "collapsed.nii.gz", head, np.diag([1e-6, 1e-6, 1e-6, 1.0]))
    write_mask(folder / "huge_voxels.nii.gz", head, np.diag([1000.0, 1000.0, 1000.0, 1.0]))
    header = nib.Nifti1Image(head, six_mm).header
    header["srow_x"][0], header["vox_offset"] = np.nan, 352
    (folder / "nan_affine.nii").write_bytes(header.binaryblock + b"\x00" * 4 + head.tobytes(order="F"))

    result = run_app("-i", folder, "-o", tmp_path / "out", "-m", demo_repository, "--scheduler", "ddim", "--steps", "2")
    assert result.returncode == 1, result.stderr
    assert "1 mask(s) synthesised, 4 failed" in result.stdout
    failed = dict(
        line.removeprefix("  FAILED ").split(": ", 1) for line in result.stdout.splitlines() if "FAILED" in line
    )
    assert failed["nan_affine"].startswith(f"{folder / 'nan_affine.nii'}: the header's voxel-to-mm transform holds NaN")
    assert failed["corner"].startswith(f"{folder / 'corner.nii.gz'}: the model's field of view (192x192x192 mm")
    assert "at most 5% of any label is accepted" in failed["corner"] and "crop it to at most" in failed["corner"]
    assert failed["collapsed"].startswith(f"{folder / 'collapsed.nii.gz'}: no label reaches the model's grid")
    assert failed["huge_voxels"].startswith(
        f"{folder / 'huge_voxels.nii.gz'}: its 32x32x32 voxels of 1000x1000x1000 "
        f"mm are 5333x5333x5333 voxels at the model's 6x6x6 mm, beyond what is"
    )
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["high"]
    record = json.loads((tmp_path / "out" / "high" / "record.json").read_text())
    lost = record["grid"]["fraction_outside_field_of_view"]
    assert 0 < lost["labelled"] <= 0.05 and lost["2"] == 0.0
    assert f"{lost['labelled']:.1%} of the labelled voxels lie outside the model's field of view" in result.stderr
    image = nib.load(tmp_path / "out" / "high" / "sample_0.nii.gz").get_fdata()
    assert np.all(image[:, :, :4] == -1.0) and np.all(image[:, :, -4:] == -1.0)  # beyond the network grid


def test_no_patient_data_reaches_outputs_or_logs(demo_repository, masks, tmp_path):
    out = tmp_path / "out"
    result = run_app(
        "-i", masks / "native.nii.gz", "-o", out, "-m", demo_repository, "--steps", "3", "--scheduler", "ddim"
    )
    assert result.returncode == 0, result.stderr
    assert PATIENT not in result.stdout + result.stderr
    for path in (out / "native").iterdir():
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        assert PATIENT.encode() not in data, path


def test_same_seed_same_volume(demo_repository, masks, tmp_path):
    def run(name):
        return run_app(
            "-i",
            masks / "native.nii.gz",
            "-o",
            tmp_path / name,
            "-m",
            demo_repository,
            "--steps",
            "8",
            "--scheduler",
            "dpmpp2m",
            env={"MEDDPM_SEED": "77"},
        )

    volumes = []
    for name, result in zip(("a", "b"), concurrently(lambda: run("a"), lambda: run("b"))):  # two processes
        assert result.returncode == 0, result.stderr
        volumes.append(nib.load(tmp_path / name / "native" / "sample_0.nii.gz").get_fdata())
    assert np.array_equal(volumes[0], volumes[1])


def test_auto_precision_is_the_gated_mixed_where_the_cpu_has_native_bf16(demo_repository, masks, tmp_path):
    """The demo preset's gate passed mixed (docs/performance.md): `auto` runs it on a CPU with native BF16, FP32
    elsewhere; mixed's volume stays close to FP32's, its tissue the same."""

    def run(precision):
        arguments = ("--steps", "8", "--scheduler", "dpmpp2m-sde", "--seed", "5", "--precision", precision)
        return run_app("-i", masks / "native.nii.gz", "-o", tmp_path / precision, "-m", demo_repository, *arguments)

    outputs = {}
    for precision, result in zip(("auto", "fp32"), concurrently(lambda: run("auto"), lambda: run("fp32"))):
        assert result.returncode == 0, result.stderr
        record = json.loads((tmp_path / precision / "native" / "record.json").read_text())
        outputs[precision] = (
            record["backend"],
            nib.load(tmp_path / precision / "native" / "sample_0.nii.gz").get_fdata(),
        )
    (auto_backend, auto), (fp32_backend, fp32) = outputs["auto"], outputs["fp32"]
    assert fp32_backend == "openvino (fp32)"
    assert auto_backend == AUTO_BACKEND
    if not native_bf16():
        assert np.array_equal(auto, fp32)
        return
    assert not np.array_equal(auto, fp32)
    assert np.abs(auto - fp32).mean() < MIXED_MEAN_DIFFERENCE
    assert dice(segment(auto), segment(fp32), BRAIN) > 0.98


def test_rescale_maps_the_model_range(demo_repository, masks, tmp_path):
    result = run_app(
        "-i",
        masks / "native.nii.gz",
        "-o",
        tmp_path,
        "-m",
        demo_repository,
        "--steps",
        "3",
        "--scheduler",
        "ddim",
        "--rescale",
        "0,1000",
    )
    assert result.returncode == 0, result.stderr
    data = nib.load(tmp_path / "native" / "sample_0.nii.gz").get_fdata()
    assert 0 <= data.min() and data.max() <= 1000 and data.max() > 100


def test_demo_model_draws_the_head_the_mask_asks_for(demo_repository, tmp_path):
    """The default run (Med-DDPM's DDPM, 250 steps) on an unseen phantom, segmented back by intensity."""
    mask, _ = make_phantom(np.random.default_rng(2024), (32, 32, 32), 6.0)
    write_mask(tmp_path / "head.nii.gz", mask, np.diag([6.0, 6.0, 6.0, 1.0]))
    result = run_app("-i", tmp_path / "head.nii.gz", "-o", tmp_path / "out", "-m", demo_repository, "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert f"preview in {tmp_path / 'out' / 'head'}" in result.stdout
    record = json.loads((tmp_path / "out" / "head" / "record.json").read_text())
    assert record["scheduler"] == "ddpm" and record["steps"] == 250
    labels = segment(nib.load(tmp_path / "out" / "head" / "sample_0.nii.gz").get_fdata())
    assert dice(labels, mask, BRAIN) > 0.8, dice(labels, mask, BRAIN)
    if (mask == TUMOUR).any():
        assert dice(labels, mask, TUMOUR) > 0.3, dice(labels, mask, TUMOUR)


# --- configuration errors: a clear message and exit code before any work ---------------------------------


def test_missing_model_repository(masks, tmp_path):
    result = run_app("-i", masks, "-o", tmp_path, env={"HOLOSCAN_MODEL_PATH": str(tmp_path / "none")})
    assert result.returncode == 5 and "no such model repository" in result.stderr


def test_missing_input(demo_repository, tmp_path):
    result = run_app("-o", tmp_path, "-m", demo_repository, env={"HOLOSCAN_INPUT_PATH": str(tmp_path / "none")})
    assert result.returncode == 3 and "no such file or folder" in result.stderr


def test_bad_settings(demo_repository, masks, tmp_path):
    scheduler, steps = concurrently(
        lambda: run_app("-i", masks, "-o", tmp_path, "-m", demo_repository, env={"MEDDPM_SCHEDULER": "euler"}),
        lambda: run_app("-i", masks, "-o", tmp_path, "-m", demo_repository, "--steps", "400"),
    )
    assert scheduler.returncode == 2 and "MEDDPM_SCHEDULER='euler'" in scheduler.stderr
    assert "ddpm, ddim" in scheduler.stderr
    assert steps.returncode == 2 and "out of range" in steps.stderr


def test_model_for_another_preset_is_refused(demo_repository, masks, tmp_path):
    result = run_app("-i", masks, "-o", tmp_path, "-m", demo_repository, "--preset", "whole-head")
    assert result.returncode == 5 and "exported for preset 'demo', not 'whole-head'" in result.stderr


def test_manifest_that_does_not_match_the_graph(demo_repository, masks, tmp_path):
    repo = copy_repository(demo_repository, tmp_path)
    manifest_path = repo / "meddpm_demo" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["preset"]["condition"]["labels"] = [1, 2, 3]
    manifest_path.write_text(json.dumps(manifest))
    result = run_app("-i", masks, "-o", tmp_path / "out", "-m", repo)
    assert result.returncode == 5 and "do not belong together" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_graph_edited_after_export_is_refused_before_any_work(demo_repository, masks, tmp_path):
    repo = copy_repository(demo_repository, tmp_path)
    graph = repo / "meddpm_demo" / "1" / "model.onnx"
    exported = sha256_of(graph)
    edit_weights(graph)
    result = run_app(
        "-i", masks / "native.nii.gz", "-o", tmp_path / "out", "-m", repo, "--steps", "2", "--scheduler", "ddim"
    )
    assert result.returncode == 5, result.stderr
    assert f"SHA-256 {sha256_of(graph)}, but {graph.parent / 'manifest.json'} states {exported}" in result.stderr
    assert "re-run `python -m export`" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_any_work(demo_repository, masks, tmp_path):
    result = run_app(
        "-i", masks, "-o", tmp_path / "out", "-m", demo_repository, "--samples", 20000, "--batch-size", 20000
    )
    assert result.returncode == 2, result.stderr
    assert "with batch 20000 needs about" in result.stderr and "--batch-size" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_in_process_nifti_run_loads_no_dicom_pacs_or_triton_module_of_ours(demo_repository, masks, tmp_path):
    """DICOM, PACS and Triton code is imported only when a setting asks for it (pydicom, highdicom and tritonclient
    themselves are loaded by the MONAI Deploy SDK whatever the app does)."""
    result = run_app(
        "-i", masks / "native.nii.gz", "-o", tmp_path, "-m", demo_repository, "--scheduler", "ddim", "--steps", "2",
        "--seed", "1", python_options=("-X", "importtime"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = imported_modules(result.stderr)
    assert "meddpm.backends.openvino_denoiser" in loaded and "meddpm.imaging.masks" in loaded
    ours = {"meddpm.dicom.reader", "meddpm.dicom.writer", "meddpm.dicom.pacs", "meddpm.backends.triton_client.client",
            "meddpm.backends.triton_client.server_loop", "meddpm.backends.triton_client.shared_memory"}  # fmt: skip
    assert loaded & (ours | {"pynetdicom", "dicomweb_client"}) == set()
