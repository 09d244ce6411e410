"""Sampling settings: one table, each setting a flag and an environment variable (the flag wins).

Paths and the Triton address are the MONAI Deploy SDK's own settings (-i/-o/-m, HOLOSCAN_INPUT_PATH,
HOLOSCAN_OUTPUT_PATH, HOLOSCAN_MODEL_PATH, TRITON_SERVER_NETLOC); this table holds the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from meddpm.errors import ConfigurationError
from meddpm.presets import SCHEDULERS
from meddpm.sampling import FAST_DEFAULT_STEPS
from meddpm.triton_denoiser import TRANSPORTS, RetryPolicy


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    env: str
    type: Callable[[str], Any]
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _rescale(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not MIN,MAX (e.g. 0,1000)") from None
    if not low < high:
        raise argparse.ArgumentTypeError(f"'{text}': MIN must be below MAX")
    return low, high


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of seconds")
    return value


def _transport(text: str) -> str:
    if text not in TRANSPORTS:
        raise argparse.ArgumentTypeError(f"'{text}' is not a transport; choose one of {', '.join(TRANSPORTS)}")
    return text


def _scheduler(text: str) -> str:
    if text not in SCHEDULERS:
        raise argparse.ArgumentTypeError(f"'{text}' is not a scheduler; choose one of {', '.join(SCHEDULERS)}")
    return text


SETTINGS = (
    Setting("model_name", "MEDDPM_MODEL", str, None, "model in the repository (default: the only one there)"),
    Setting("preset", "MEDDPM_PRESET", str, None, "refuse a model exported for any other preset"),
    Setting("scheduler", "MEDDPM_SCHEDULER", _scheduler, None, f"one of {', '.join(SCHEDULERS)} (default: the preset's)"),
    Setting("steps", "MEDDPM_STEPS", _positive, None, "denoising steps, i.e. UNet calls (default: the preset's for its "
            "own scheduler, else " + ", ".join(f"{k} {v}" for k, v in FAST_DEFAULT_STEPS.items()) + ")"),
    Setting("seed", "MEDDPM_SEED", int, None, "seed of sample 0; sample i uses seed + i (default: random, recorded)"),
    Setting("samples", "MEDDPM_SAMPLES", _positive, 1, "synthetic volumes per mask"),
    Setting("batch_size", "MEDDPM_BATCH_SIZE", _positive, 1, "samples sent through the UNet together"),
    Setting("rescale", "MEDDPM_RESCALE", _rescale, None, "MIN,MAX: map the model range [-1, 1] linearly onto it"),
    Setting("threads", "MEDDPM_THREADS", int, 0, "ONNX Runtime intra-op threads (0: one per core)"),
    Setting("triton_model", "MEDDPM_TRITON_MODEL", str, None, "served model to call (default: NAME or NAME_cpu, "
            "whichever is ready)"),
    Setting("triton_transport", "MEDDPM_TRITON_TRANSPORT", _transport, "auto", "shm: shared memory (same host); "
            "network: tensors in the gRPC messages; auto: shm when the server is on this host and can map it"),
    Setting("triton_deadline", "MEDDPM_TRITON_DEADLINE", _seconds, RetryPolicy.deadline_s, "seconds one UNet call "
            "may take before it is retried"),
    Setting("triton_retry_window", "MEDDPM_TRITON_RETRY_WINDOW", _seconds, RetryPolicy.window_s, "seconds to wait "
            "for a server that is away (at the start, or restarting mid-run) before giving up"),
)


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    model_name: str | None = None
    preset: str | None = None
    scheduler: str | None = None
    steps: int | None = None
    seed: int | None = None
    samples: int = 1
    batch_size: int = 1
    rescale: tuple[float, float] | None = None
    threads: int = 0
    triton_model: str | None = None
    triton_transport: str = "auto"
    triton_deadline: float = RetryPolicy.deadline_s
    triton_retry_window: float = RetryPolicy.window_s


def parse_settings(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> tuple[SamplingSettings, list[str]]:
    """Settings from flags and environment; returns them with the arguments left for the SDK."""
    parser = argparse.ArgumentParser(add_help=False)
    values = {}
    for setting in SETTINGS:
        parser.add_argument(setting.flag, dest=setting.name, type=setting.type, default=None, help=setting.help)
    args, rest = parser.parse_known_args(list(argv))
    for setting in SETTINGS:
        value = getattr(args, setting.name)
        if value is None and setting.env in environ:
            try:
                value = setting.type(environ[setting.env])
            except (argparse.ArgumentTypeError, ValueError) as error:
                raise ConfigurationError(f"{setting.env}={environ[setting.env]!r}: {error}") from None
        values[setting.name] = setting.default if value is None else value
    return SamplingSettings(**values), rest


def settings_help() -> str:
    """The table, for --help and the README."""
    lines = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        lines.append(f"| `{s.flag}` | `{s.env}` | {'-' if s.default is None else s.default} | {s.help} |")
    return "\n".join(lines)
