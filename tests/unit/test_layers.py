"""The core's shape: the sampling core runs from its exported copy alone, and `--help` loads none of the heavy
libraries (the layers themselves are checked by lint-imports in scripts/check.sh)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

from meddpm.model.manifest import sha256_of
from meddpm.sampling import sampler_files
from tests.conftest import REPO
from tests.helpers import imported_modules, run_app


def test_the_sampling_core_runs_from_its_copy_alone(tmp_path):
    """What the `_sampler` model ships (meddpm.sampling.sampler_files.FILES) is enough to run the loop, and hashes
    as the manifest records it."""
    for name in sampler_files.FILES:
        (tmp_path / "meddpm" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sampler_files.PACKAGE / name, tmp_path / "meddpm" / name)
    script = textwrap.dedent(f"""
        import contextlib, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import numpy as np
        from meddpm.model.presets import Preset
        from meddpm.model.manifest import sha256_of
        from meddpm.sampling import sampler_files, protocol
        from meddpm.sampling.denoiser import Denoiser
        from meddpm.sampling.loop import sample

        class Zero(Denoiser):
            @contextlib.contextmanager
            def conditioned(self, condition):
                yield lambda noisy_image, timestep: np.zeros_like(noisy_image)

        preset = Preset.from_dict("p", {{
            "unet": {{"model_channels": 8, "num_res_blocks": 1, "channel_mult": [1], "attention_factors": [],
                     "norm_groups": 4}},
            "condition": {{"labels": [1], "scale": "symmetric"}},
            "image": {{"channels": ["T1"], "grid": [4, 4, 4], "voxel_size_mm": [1, 1, 1], "orientation": "RAS",
                      "axis_order": "reversed"}},
            "schedule": {{"timesteps": 250, "beta_schedule": "squaredcos_cap_v2", "default_scheduler": "ddpm",
                         "default_steps": 250}}}})
        request, unet = protocol.decode_request(
            {{"scheduler": "dpmpp2m-sde", "steps": 3, "seed": 1, "samples": 2, "unet_model": "u"}}, ["u"])
        image = sample(Zero(), np.ones((1, 4, 4, 4), np.float32), request, preset)
        assert image.shape == (2, 1, 4, 4, 4)
        ours = sorted(m.__file__ for n, m in sys.modules.items() if n.split(".")[0] == "meddpm")
        assert all(path.startswith({str(tmp_path)!r}) for path in ours), ours
        print(sampler_files.code_sha256(), sha256_of(sampler_files.PACKAGE))
    """)
    result = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    in_copy, copy_tree = result.stdout.split()
    assert in_copy == copy_tree == sha256_of(tmp_path / "meddpm") == sampler_files.code_sha256()


def test_help_loads_no_sdk_dicom_pacs_or_triton_library():
    result = run_app("--help", python_options=("-X", "importtime"), timeout=300)
    assert result.returncode == 0 and "| `--scheduler` |" in result.stdout, result.stderr
    loaded = {name.split(".")[0] for name in imported_modules(result.stderr)}
    heavy = {
        "holoscan",
        "monai",
        "torch",
        "diffusers",
        "onnxruntime",
        "pydicom",
        "highdicom",
        "pynetdicom",
        "dicomweb_client",
        "tritonclient",
    }
    assert loaded & heavy == set()


def test_no_module_of_ours_shadows_an_installed_one():
    """The MAP's image puts every folder of the packages on PYTHONPATH ahead of their parent (holoscan-cli's
    Dockerfile template): a module named like an installed package (say `onnxruntime.py`) would replace it."""
    ours = {REPO / top for top in ("meddpm", "app", "export")}
    names = {p.stem for top in ours for p in top.rglob("*.py") if p.stem not in ("__init__", "__main__")}
    names |= {p.name for top in ours for p in top.rglob("*") if (p / "__init__.py").is_file()}
    script = (
        "import importlib.util, sys\n"
        "for name in sys.argv[1:]:\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    if spec and spec.origin and 'site-packages' in spec.origin: print(name, spec.origin)\n"
    )
    result = subprocess.run([sys.executable, "-I", "-c", script, *sorted(names)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
