"""Reading and writing Med-DDPM checkpoints in the layouts the release uses.

Layouts accepted (all loaded with `weights_only=True` on the CPU; pickled code is refused):
- "ema": `{"ema": {"denoise_fn.<unet key>": ..., <schedule buffers>}, ...}` (model_128.pt, model_brats.pt,
  training checkpoints, which also hold "model" and "step"; sampling uses "ema");
- "model": `{"model": {<unet key>: ...}}` (3dcddpm_net.pth), with or without the `denoise_fn.` prefix;
- a bare UNet state dict.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from pathlib import Path

import torch

from meddpm.errors import CheckpointError
from meddpm.model.manifest import sha256_of
from meddpm.model.presets import Preset, load_presets
from meddpm.model.schedule import BUFFER_NAMES, betas, meddpm_buffers
from meddpm.model.unet import MedDDPMUNet, build_unet

UNET_PREFIX = "denoise_fn."
SCHEDULE_RTOL, SCHEDULE_ATOL = 1e-5, 1e-7
_SHOWN = 5  # how many offending tensor names an error message lists
ZIP_SIGNATURE, PICKLE_PROTOCOL = b"PK\x03\x04", b"\x80"  # torch.save archives; legacy pickles


@dataclasses.dataclass
class LoadedCheckpoint:
    unet: MedDDPMUNet
    layout: str  # "ema", "model" or "bare"
    sha256: str
    schedule_checked: bool  # whether schedule buffers were found and matched the preset


def load_checkpoint(
    path: str | os.PathLike, preset: Preset, schedule_file: str | os.PathLike | None = None
) -> LoadedCheckpoint:
    """Load a Med-DDPM checkpoint into a UNet built from `preset`, checking names, shapes and schedule."""
    path = Path(path)
    layout, tensors = _unet_tensors(path, _read(path))
    unet_state = {k: v for k, v in tensors.items() if k not in BUFFER_NAMES}
    schedule = {k: v for k, v in tensors.items() if k in BUFFER_NAMES}
    if schedule_file is not None:
        params = _read(Path(schedule_file))
        if not isinstance(params, dict) or "betas" not in params:
            raise CheckpointError(f"{schedule_file}: expected a dict with 'betas' (like 3dcddpm_params.pth)")
        schedule["betas"] = params["betas"]

    unet = build_unet(preset)
    _check_tensors(path, preset, unet_state, unet)
    _check_finite(path, unet_state)
    unet.load_state_dict(unet_state)
    unet.eval()
    _check_schedule(path, preset, schedule)
    return LoadedCheckpoint(unet, layout, sha256_of(path), bool(schedule))


def read_unet_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The UNet's tensors of a checkpoint in any of Med-DDPM's layouts, without the wrapper's prefix, refused if
    unreadable or not finite; for code that adapts them before building a UNet (training's `--init`)."""
    path = Path(path)
    tensors = _unet_tensors(path, _read(path))[1]
    unet_state = {k: v for k, v in tensors.items() if k not in BUFFER_NAMES}
    _check_finite(path, unet_state)
    return unet_state


def save_meddpm_checkpoint(path: str | os.PathLike, unet: MedDDPMUNet, preset: Preset, step: int) -> None:
    """Write `unet` in Med-DDPM's "ema" layout (the wrapper's state dict with schedule buffers)."""
    ema = {**meddpm_buffers(betas(preset.schedule))}
    ema.update({UNET_PREFIX + k: v.detach().cpu().clone() for k, v in unet.state_dict().items()})
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"ema": ema, "step": step}, tmp)
    os.replace(tmp, path)


def _read(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; pass the path of a .pt/.pth file")
    try:
        with path.open("rb") as f:
            signature = f.read(4)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror}); make the file readable") from None
    if signature != ZIP_SIGNATURE and signature[:1] != PICKLE_PROTOCOL:
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (neither a torch.save archive nor a pickle); expected a file "
            f"written by torch.save, such as Med-DDPM's model_128.pt"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = next((line.strip() for line in str(error).splitlines() if "Unsupported" in line), "")
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers, and "
            f"loading those would run pickled code ({detail or 'weights_only load failed'}); re-save the "
            f"state dict alone with torch.save"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {str(error).splitlines()[0]}); "
            f"expected a file written by torch.save, such as Med-DDPM's model_128.pt"
        ) from None


def _unet_tensors(path: Path, raw: object) -> tuple[str, dict[str, torch.Tensor]]:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: holds a {type(raw).__name__}, not a dict of tensors; not a Med-DDPM checkpoint")
    for key in ("ema", "model"):
        if key in raw and isinstance(raw[key], dict):
            return key, _strip_prefix(raw[key])
    if (
        raw
        and all(isinstance(v, torch.Tensor) for v in raw.values())
        and any(k.removeprefix(UNET_PREFIX).startswith("input_blocks.") for k in raw)
    ):
        return "bare", _strip_prefix(raw)
    keys = ", ".join(repr(k) for k in list(raw)[:10]) or "none"
    raise CheckpointError(
        f"{path}: unknown checkpoint layout; top-level keys found: {keys}. Expected 'ema' (model_128.pt, "
        f"model_brats.pt), 'model' (3dcddpm_net.pth) or a bare UNet state dict"
    )


def _strip_prefix(state: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix(UNET_PREFIX): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _check_tensors(path: Path, preset: Preset, found: dict[str, torch.Tensor], unet: MedDDPMUNet) -> None:
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in found.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong_shape = [k for k in expected if k in got and expected[k] != got[k]]
    if not (missing or unexpected or wrong_shape):
        return
    fitting = [name for name, p in load_presets().items() if name != preset.name and _fits(p, got)]
    hint = (
        f"; these tensors fit preset '{fitting[0]}': pass --preset {fitting[0]}"
        if fitting
        else "; no known preset fits them: add a preset describing this network (see meddpm/model/presets.toml)"
    )
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:_SHOWN])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:_SHOWN])})")
        raise CheckpointError(f"{path}: tensors do not match preset '{preset.name}': {'; '.join(parts)}{hint}")
    shown = "; ".join(f"{k}: checkpoint {list(got[k])}, preset {list(expected[k])}" for k in wrong_shape[:_SHOWN])
    raise CheckpointError(f"{path}: {len(wrong_shape)} tensor shapes differ from preset '{preset.name}': {shown}{hint}")


def _check_finite(path: Path, state: dict[str, torch.Tensor]) -> None:
    """NaN or infinite weights make every output NaN; refuse them before anything is exported."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} tensor(s) hold NaN or infinite values (e.g. {', '.join(bad[:_SHOWN])}); the weights "
            f"are corrupt or the training diverged: use an earlier checkpoint of the run, or the file as released"
        )


def _fits(preset: Preset, shapes: dict[str, tuple]) -> bool:
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_unet(preset).state_dict().items()}
    return expected == shapes


def _check_schedule(path: Path, preset: Preset, found: dict[str, torch.Tensor]) -> None:
    reference = meddpm_buffers(betas(preset.schedule))
    for name, value in found.items():
        ref = reference[name]
        if value.shape != ref.shape or not torch.allclose(value.double(), ref.double(), SCHEDULE_RTOL, SCHEDULE_ATOL):
            worst = (value.double() - ref.double()).abs().max().item() if value.shape == ref.shape else float("nan")
            raise CheckpointError(
                f"{path}: schedule buffer '{name}' (shape {list(value.shape)}) differs from preset "
                f"'{preset.name}' ({preset.schedule.timesteps} steps, {preset.schedule.beta_schedule}; "
                f"max difference {worst:.3g}); sampling with the wrong schedule gives noise: fix the preset's "
                f"[schedule] table to the one the model was trained with"
            )
