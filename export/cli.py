"""`python -m export`: a Med-DDPM checkpoint in, a verified Triton model repository entry out."""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import tempfile
from pathlib import Path

import meddpm
from export import onnx_graph, repository, tensorrt_plan
from meddpm.errors import MedDDPMError
from meddpm.model.checkpoint import load_checkpoint
from meddpm.model.manifest import SAMPLER_PACKAGE, CheckpointRecord, GraphRecord, Manifest, SamplerCodeRecord, sha256_of
from meddpm.model.presets import get_preset
from meddpm.model.served_model import Entry
from meddpm.model.tensors import INPUTS, PREDICTED_NOISE
from meddpm.model.unet import ConditionalDenoiser
from meddpm.sampling import sampler_files

log = logging.getLogger("export")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    parser.add_argument("--checkpoint", required=True, type=Path, help="Med-DDPM checkpoint (.pt/.pth)")
    parser.add_argument("--preset", required=True, help="preset name (meddpm/model/presets.toml or --presets)")
    parser.add_argument("--repository", required=True, type=Path, help="Triton model repository folder")
    parser.add_argument("--name", help="model name in the repository (default: meddpm_<preset>)")
    parser.add_argument("--presets", type=Path, help="extra preset file (TOML), e.g. for a fine-tune")
    parser.add_argument("--schedule-file", type=Path, help="separate schedule file, e.g. 3dcddpm_params.pth")
    parser.add_argument("--max-batch-size", type=int, default=4, help="Triton max_batch_size (default 4)")
    parser.add_argument(
        "--tensorrt-accelerator",
        action="store_true",
        help="enable ONNX Runtime's TensorRT accelerator (FP16) in the GPU config",
    )
    parser.add_argument(
        "--tensorrt-plan",
        action="store_true",
        help="also build a TensorRT plan entry NAME_trt (needs tensorrt and a GPU)",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Manifest:
    preset = get_preset(args.preset, args.presets)
    name = args.name if args.name is not None else "meddpm_" + preset.name.replace("-", "_")
    repository.check_model_name(name)
    loaded = load_checkpoint(args.checkpoint, preset, args.schedule_file)
    log.info(
        "loaded %s (layout '%s', schedule %s)",
        args.checkpoint.name,
        loaded.layout,
        "checked" if loaded.schedule_checked else "not stored in the checkpoint",
    )
    model = ConditionalDenoiser(loaded.unet).eval()

    with tempfile.TemporaryDirectory(prefix="meddpm-export-") as work:
        onnx_path = Path(work) / "model.onnx"
        onnx_graph.export_onnx(model, preset, onnx_path)
        verification = onnx_graph.verify_onnx(onnx_path, model, preset)
        print_verification(verification)
        onnx_graph.require_passed(verification, args.checkpoint)

        versions = repository.package_versions()
        manifest = Manifest(
            preset=preset,
            checkpoint=CheckpointRecord(args.checkpoint.name, loaded.sha256, loaded.layout, loaded.schedule_checked),
            onnx=GraphRecord(
                "model.onnx",
                sha256_of(onnx_path),
                onnx_path.stat().st_size,
                onnx_graph.OPSET,
                INPUTS,
                PREDICTED_NOISE,
                preset.unet.downsample_factor,
            ),
            sampler_package=SamplerCodeRecord(
                SAMPLER_PACKAGE, sampler_files.code_sha256(), sampler_files.FILES, meddpm.__version__
            ),
            verification=verification.to_dict(),
            versions=versions,
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )
        onnx_sha256 = manifest.onnx.sha256
        entries = {
            name: (
                repository.model_config(
                    name, preset, Entry.UNET, args.max_batch_size, onnx_sha256, args.tensorrt_accelerator
                ),
                {"model.onnx": onnx_path},
            ),
            name + Entry.OPENVINO: (
                repository.model_config(
                    name + Entry.OPENVINO, preset, Entry.OPENVINO, args.max_batch_size, onnx_sha256
                ),
                {"model.onnx": onnx_path},
            ),
            name + Entry.CPU: (
                repository.model_config(name + Entry.CPU, preset, Entry.CPU, args.max_batch_size, onnx_sha256),
                {"model.onnx": onnx_path, "model.py": repository.PYTHON_MODEL_SOURCE},
            ),
        }
        if args.tensorrt_plan:
            plan_path = Path(work) / "model.plan"
            tensorrt_plan.build_plan(onnx_path, plan_path, preset, args.max_batch_size)
            entries[name + Entry.TRT] = (
                repository.model_config(name + Entry.TRT, preset, Entry.TRT, args.max_batch_size, onnx_sha256),
                {"model.plan": plan_path},
            )
        entries[name + Entry.SAMPLER] = (  # the loop on the server, calling any of the UNet entries
            repository.sampler_config(
                name + Entry.SAMPLER,
                preset,
                {entry: config.max_batch_size for entry, (config, _) in entries.items()},
                manifest.sampler_package.sha256,
            ),
            {"model.py": repository.SAMPLER_MODEL_SOURCE, **repository.SAMPLER_CORE_FILES},
        )
        for entry_name, (config, files) in entries.items():
            path = repository.write_entry(args.repository, entry_name, config, files, manifest)
            print(f"wrote {path}")
    return manifest


def print_verification(verification: onnx_graph.Verification) -> None:
    print(f"verification (ONNX Runtime vs PyTorch, {verification.seconds:.1f} s):")
    for case in verification.cases:
        print(
            f"  batch {case.batch} grid {'x'.join(map(str, case.grid))} t={case.timesteps}: "
            f"max abs error {case.max_abs_error:.2e}, relative {case.relative_error:.2e}"
        )
    verdict = "PASSED" if verification.passed else "FAILED"
    print(
        f"  {verdict}: max relative error {verification.max_relative_error:.2e} "
        f"(tolerance {verification.tolerance:.0e}), max abs error {verification.max_abs_error:.2e}"
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("export").setLevel(logging.INFO)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
    args = parse_args(argv)
    try:
        run(args)
    except MedDDPMError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0
