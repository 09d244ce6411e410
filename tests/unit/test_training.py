"""Training resumes where it stopped: a run cut in two ends with the weights an unbroken run ends with."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
import torch

from meddpm.errors import CheckpointError
from meddpm.imaging.geometry import condition_channels
from meddpm.imaging.template_heads import TISSUES, make_template_head, whole_head
from meddpm.model.checkpoint import load_checkpoint, save_meddpm_checkpoint
from meddpm.model.presets import get_preset
from meddpm.model.unet import build_unet
from tests.conftest import randomise
from training.train_demo import _initial_unet, train


def run(out, until=None, **changes):
    settings = dict(
        preset="demo",
        steps=4,
        batch=1,
        lr=1e-3,
        seed=5,
        out=out,
        init=None,
        ema_decay=0.9,
        save_every=100,
        until=until,
        echo=2,
        min_snr_gamma=5.0,
        input_perturbation=0.1,
        whole_head_share=0.2,
    )
    settings.update(changes)
    torch.manual_seed(settings["seed"])  # the initial weights, as main() draws them
    train(argparse.Namespace(**settings))


def test_a_run_stopped_and_resumed_ends_where_an_unbroken_run_ends(tmp_path):
    run(tmp_path / "whole.pt")
    run(tmp_path / "split.pt", until=3)  # mid-echo: step 4 mirrors step 3's heads
    preset = get_preset("demo")
    assert torch.load(tmp_path / "split.pt", weights_only=True)["step"] == 3
    halfway = load_checkpoint(tmp_path / "split.pt", preset)
    run(tmp_path / "split.pt")
    whole = load_checkpoint(tmp_path / "whole.pt", preset).unet.state_dict()
    split = load_checkpoint(tmp_path / "split.pt", preset).unet.state_dict()
    assert whole.keys() == split.keys()
    assert all(torch.equal(whole[name], split[name]) for name in whole)
    assert not all(torch.equal(split[name], tensor) for name, tensor in halfway.unet.state_dict().items())


def test_resuming_with_other_settings_is_refused_with_the_fix(tmp_path):
    run(tmp_path / "model.pt", until=1)
    with pytest.raises(SystemExit, match="resume with those settings"):
        run(tmp_path / "model.pt", lr=5e-4)


def test_a_whole_head_checkpoint_starts_a_run_on_finer_labels_where_it_was(tmp_path):
    """--init with a checkpoint of Med-DDPM's whole-head convention (labels 1, 2) for mni152-demo (labels 1-5): its
    first convolution reads a fine mask as the old one read the mask's whole-head version."""
    preset = get_preset("mni152-demo")
    whole_head_preset = dataclasses.replace(preset, condition=dataclasses.replace(preset.condition, labels=(1, 2)))
    old = randomise(build_unet(whole_head_preset), seed=3)
    save_meddpm_checkpoint(tmp_path / "old.pt", old, whole_head_preset, step=1)
    new = _initial_unet(tmp_path / "old.pt", preset)

    mask, _ = make_template_head(np.random.default_rng(0), (32, 32, 32), 6.0)
    assert set(TISSUES) <= set(np.unique(mask))
    x = torch.randn((1, 1, 32, 32, 32))
    fine = torch.from_numpy(condition_channels(mask, preset)[None])
    coarse = torch.from_numpy(condition_channels(whole_head(mask), whole_head_preset)[None])
    with torch.no_grad():
        reads_fine = new.input_blocks[0][0](torch.cat([x, fine], dim=1))
        reads_coarse = old.input_blocks[0][0](torch.cat([x, coarse], dim=1))
    inside = (slice(None), slice(None), *(slice(1, -1),) * 3)  # the zero padding reads the codings differently
    assert torch.allclose(reads_fine[inside], reads_coarse[inside], atol=1e-4)
    with pytest.raises(SystemExit, match="do not refine them"):
        _initial_unet(tmp_path / "old.pt", dataclasses.replace(preset, name="demo"))
    with torch.no_grad():
        old.input_blocks[0][0].weight[0, 0, 0, 0, 0] = float("nan")
    save_meddpm_checkpoint(tmp_path / "diverged.pt", old, whole_head_preset, step=2)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        _initial_unet(tmp_path / "diverged.pt", preset)
