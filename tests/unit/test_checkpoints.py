"""Released checkpoint layouts load unchanged; every loading error says what is wrong."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from meddpm.errors import CheckpointError
from meddpm.model.checkpoint import load_checkpoint, save_meddpm_checkpoint
from meddpm.model.presets import get_preset
from meddpm.model.unet import build_unet
from tests.conftest import randomise, reference_keys
from tests.helpers import cosine_betas

SCHEDULE_BUFFERS = 13


def reference_buffers(betas: np.ndarray) -> dict[str, torch.Tensor]:
    alphas = 1 - betas
    a_bar = np.cumprod(alphas)
    a_prev = np.append(1.0, a_bar[:-1])
    variance = betas * (1 - a_prev) / (1 - a_bar)
    coef2 = (1 - a_prev) * np.sqrt(alphas) / (1 - a_bar)
    values = dict(
        betas=betas,
        alphas_cumprod=a_bar,
        alphas_cumprod_prev=a_prev,
        sqrt_alphas_cumprod=np.sqrt(a_bar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1 - a_bar),
        log_one_minus_alphas_cumprod=np.log(1 - a_bar),
        sqrt_recip_alphas_cumprod=np.sqrt(1 / a_bar),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1 / a_bar - 1),
        posterior_variance=variance,
        posterior_log_variance_clipped=np.log(np.maximum(variance, 1e-20)),
        posterior_mean_coef1=betas * np.sqrt(a_prev) / (1 - a_bar),
        posterior_mean_coef2=coef2,
        posterior_mean_coef3=1 - coef2,
    )
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


def released_checkpoint(preset_name: str, path, schedule_betas: np.ndarray | None = None) -> dict:
    """A checkpoint in the release's layout, names and shapes from the reference list, random values."""
    keys = reference_keys()[preset_name]
    generator = torch.Generator().manual_seed(1)
    buffers = reference_buffers(cosine_betas() if schedule_betas is None else schedule_betas)
    state = {
        name: buffers[name] if name in buffers else torch.randn(shape, generator=generator) * 0.02
        for name, shape in keys.items()
    }
    checkpoint = {"model": state} if preset_name == "fast-sampling" else {"ema": state, "step": 100000}
    torch.save(checkpoint, path)
    return state


@pytest.mark.parametrize("preset_name", ["whole-head", "brats", "fast-sampling"])
def test_released_layouts_load_unchanged(preset_name, tmp_path):
    path = tmp_path / "release.pt"
    state = released_checkpoint(preset_name, path)
    loaded = load_checkpoint(path, get_preset(preset_name))
    assert loaded.layout == ("model" if preset_name == "fast-sampling" else "ema")
    assert loaded.schedule_checked == (preset_name != "fast-sampling")
    for name, value in loaded.unet.state_dict().items():
        assert torch.equal(value, state[name if preset_name == "fast-sampling" else "denoise_fn." + name]), name


def test_fast_sampling_params_file_is_checked(tmp_path):
    released_checkpoint("fast-sampling", tmp_path / "3dcddpm_net.pth")
    torch.save({"betas": torch.tensor(cosine_betas())}, tmp_path / "3dcddpm_params.pth")
    loaded = load_checkpoint(tmp_path / "3dcddpm_net.pth", get_preset("fast-sampling"), tmp_path / "3dcddpm_params.pth")
    assert loaded.schedule_checked
    torch.save({"betas": torch.linspace(1e-4, 0.02, 250)}, tmp_path / "linear.pth")
    with pytest.raises(CheckpointError, match="schedule buffer 'betas'"):
        load_checkpoint(tmp_path / "3dcddpm_net.pth", get_preset("fast-sampling"), tmp_path / "linear.pth")


def test_full_size_parameter_counts():
    counts = {"whole-head": 40_226_433, "brats": 57_562_564, "fast-sampling": 9_953_409}
    for name, count in counts.items():
        with torch.device("meta"):
            assert sum(p.numel() for p in build_unet(get_preset(name)).parameters()) == count, name


def test_our_checkpoints_round_trip(presets, tmp_path):
    unet = randomise(build_unet(presets["tiny"]))
    save_meddpm_checkpoint(tmp_path / "ours.pt", unet, presets["tiny"], step=7)
    raw = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert raw["step"] == 7 and sum(k.startswith("denoise_fn.") for k in raw["ema"]) == len(unet.state_dict())
    assert len(raw["ema"]) - len(unet.state_dict()) == SCHEDULE_BUFFERS
    loaded = load_checkpoint(tmp_path / "ours.pt", presets["tiny"])
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(), unet.state_dict().values()))


# --- errors, each on a real bad file -------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.pt", get_preset("whole-head"))


def test_truncated_file_is_unreadable(presets, tmp_path):
    save_meddpm_checkpoint(tmp_path / "full.pt", build_unet(presets["tiny"]), presets["tiny"], 1)
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "cut.pt", presets["tiny"])


def test_text_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "notes.pt", get_preset("whole-head"))


class Payload:
    """Stands for pickled code: weights_only loading must refuse it, never run it."""

    def __reduce__(self):
        return (print, ("this must never run",))


# torch notes the crafted pickle's protocol before it refuses the file
@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")
def test_pickled_code_is_refused(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"ema": Payload()}, f)
    torch.save({"ema": {"x": torch.zeros(1)}, "args": Payload()}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(CheckpointError, match="refused to load: .*would run pickled code"):
            load_checkpoint(tmp_path / name, get_preset("whole-head"))
    assert "must never run" not in capsys.readouterr().out


def test_unknown_layout_lists_top_level_keys(tmp_path):
    torch.save({"weights": {"a": torch.zeros(1)}, "epoch": 3}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint layout; top-level keys found: 'weights', 'epoch'"):
        load_checkpoint(tmp_path / "odd.pt", get_preset("whole-head"))


@pytest.mark.parametrize(
    ("released", "asked", "expected"),
    [
        ("fast-sampling", "whole-head", "missing (e.g. input_blocks.7.1"),  # no attention at factor 8
        ("brats", "whole-head", "unexpected (e.g."),  # two residual blocks a level: more blocks
    ],
)
def test_mismatched_tensors_name_the_preset_that_fits(released, asked, expected, tmp_path):
    released_checkpoint(released, tmp_path / "release.pt")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path / "release.pt", get_preset(asked))
    assert expected in str(error.value) and f"fit preset '{released}': pass --preset {released}" in str(error.value)


def test_unexpected_tensors_are_named(tmp_path):
    state = released_checkpoint("whole-head", tmp_path / "model_128.pt")
    state["denoise_fn.extra_head.weight"] = torch.zeros(3)
    torch.save({"ema": state}, tmp_path / "model_128.pt")
    with pytest.raises(CheckpointError, match=r"1 unexpected \(e.g. extra_head.weight\).*no known preset fits"):
        load_checkpoint(tmp_path / "model_128.pt", get_preset("whole-head"))


def test_shape_mismatch_message(presets, tmp_path):
    state = {k: v for k, v in build_unet(presets["tiny"]).state_dict().items()}
    state["out.2.weight"] = torch.zeros(2, 8, 3, 3, 3)
    torch.save({"model": state}, tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match=r"out.2.weight: checkpoint \[2, 8, 3, 3, 3\], preset \[1, 8, 3, 3, 3\]"):
        load_checkpoint(tmp_path / "wide.pt", presets["tiny"])


def test_non_finite_weights_are_named_before_export(presets, test_presets_file, tmp_path, capsys):
    from export.cli import main as export_main

    unet = randomise(build_unet(presets["tiny"]))
    with torch.no_grad():
        unet.out[2].weight[0, 0, 0, 0, 0] = float("nan")
        unet.input_blocks[0][0].bias[1] = float("inf")
    save_meddpm_checkpoint(tmp_path / "diverged.pt", unet, presets["tiny"], step=9)
    with pytest.raises(
        CheckpointError,
        match=r"diverged.pt: 2 tensor\(s\) hold NaN or infinite values \(e.g. "
        r"input_blocks.0.0.bias, out.2.weight\)",
    ):
        load_checkpoint(tmp_path / "diverged.pt", presets["tiny"])
    code = export_main(
        [
            "--checkpoint",
            str(tmp_path / "diverged.pt"),
            "--preset",
            "tiny",
            "--presets",
            str(test_presets_file),
            "--repository",
            str(tmp_path / "repo"),
        ]
    )
    assert code == CheckpointError.exit_code and "NaN or infinite" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_schedule_mismatch_is_reported(tmp_path):
    released_checkpoint("whole-head", tmp_path / "linear.pt", schedule_betas=np.linspace(1e-4, 0.02, 250))
    with pytest.raises(CheckpointError, match="schedule buffer 'betas'.*differs from preset 'whole-head'"):
        load_checkpoint(tmp_path / "linear.pt", get_preset("whole-head"))
