"""Training resumes where it stopped: a run cut in two ends with the weights an unbroken run ends with."""

from __future__ import annotations

import argparse

import pytest
import torch

from meddpm.model.checkpoint import load_checkpoint
from meddpm.model.presets import get_preset
from training.train_demo import train


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
