"""The run's settings: one declaration (`RunSettings`), each setting a flag and an environment variable (the flag
wins), and one `validate` for the checks across settings.

Paths and the Triton address are the MONAI Deploy SDK's own settings (-i/-o/-m, HOLOSCAN_INPUT_PATH,
HOLOSCAN_OUTPUT_PATH, HOLOSCAN_MODEL_PATH, TRITON_SERVER_NETLOC); this table holds the rest. It imports only the
option modules of the core (no DICOM, PACS, Triton or MONAI Deploy library), so that `--help` starts at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from typing import Any

from meddpm.backends.options import Backend
from meddpm.backends.triton_client.options import LoopMode, RetryPolicy, Transport
from meddpm.choices import parse_choice
from meddpm.dicom.options import (
    COPYABLE_ATTRIBUTES,
    PACS_DEADLINE_S,
    PACS_MAX_PAUSE_S,
    PACS_TIMEOUT_S,
    CStoreDestination,
    IdentityPolicy,
    SegmentMap,
    ae_title,
    check_stow_url,
)
from meddpm.errors import ConfigurationError
from meddpm.imaging.formats import OutputFormat
from meddpm.model.presets import Precision, Preset, Scheduler
from meddpm.sampling.request import MAX_SEED
from meddpm.sampling.schedulers import SCHEDULERS

USAGE = """usage: python -m app [-i INPUT] [-o OUTPUT] [-m MODEL_REPOSITORY] [-l LEVEL] [sampling settings]

  -i/--input   NIfTI mask, DICOM SEG, or a folder of masks and DICOM series (HOLOSCAN_INPUT_PATH, default: input)
  -o/--output  output folder, one subfolder per mask (HOLOSCAN_OUTPUT_PATH, default: output)
  -m/--model   Triton model repository from `python -m export` (HOLOSCAN_MODEL_PATH, default: models)
  --triton-server-netloc HOST:PORT  run the UNet on this Triton server over gRPC (TRITON_SERVER_NETLOC);
               the model's manifest is still read from -m
  -l/--log-level DEBUG|INFO|WARN|ERROR

Sampling settings:
"""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One field of RunSettings as the command line and the environment see it."""

    name: str
    env: str
    type: Callable[[str], Any]
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def setting(env: str, parse: Callable[[str], Any], default: Any, help: str) -> Any:
    """A RunSettings field: its default, and how the flag --NAME and the variable `env` are parsed and explained."""
    return dataclasses.field(default=default, metadata={"env": env, "type": parse, "help": help})


RESCALE_LIMIT = 1e30  # volumes are written as float32 (up to 3.4e38): MAX - MIN must stay finite there


def _rescale(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not MIN,MAX (e.g. 0,1000)") from None
    if not all(math.isfinite(v) and abs(v) <= RESCALE_LIMIT for v in (low, high)):
        raise argparse.ArgumentTypeError(f"'{text}': MIN and MAX must be finite numbers within ±{RESCALE_LIMIT:g}")
    if not low < high:
        raise argparse.ArgumentTypeError(f"'{text}': MIN must be below MAX")
    return low, high


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is not a seed from 0 to {MAX_SEED} (2^63 - 1)")
    return value


def _threads(text: str) -> int:
    value, cores = int(text), len(os.sched_getaffinity(0))
    if not 0 <= value <= cores:
        raise argparse.ArgumentTypeError(
            f"{value} threads: choose 0 (one per core) to {cores} (the cores this "
            f"process may use); more threads than cores only slow each step"
        )
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


MAX_SECONDS = 86400.0  # a day: no wait of the app is meant to be longer


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{value} is not a number of seconds above 0 and at most {MAX_SECONDS:g}")
    return value


def _choice(kind: type[StrEnum], what: str) -> Callable[[str], StrEnum]:
    """A parser of one member of an option set."""

    def parse(text: str) -> StrEnum:
        try:
            return parse_choice(kind, text, what)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _output_formats(text: str) -> tuple[OutputFormat, ...]:
    try:
        formats = {parse_choice(OutputFormat, f.strip(), "output format") for f in text.split(",") if f.strip()}
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"'{text}': {error}") from None
    if not formats:
        raise argparse.ArgumentTypeError(f"'{text}' names no output format; choose from {', '.join(OutputFormat)}")
    return tuple(f for f in OutputFormat if f in formats)


def _keywords(text: str) -> tuple[str, ...]:
    keywords = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in keywords if k not in COPYABLE_ATTRIBUTES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown)} cannot be copied; choose from {', '.join(COPYABLE_ATTRIBUTES)}"
        )
    return keywords


def _segment_map(text: str) -> SegmentMap:
    try:
        return SegmentMap.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _cstore(text: str) -> CStoreDestination:
    try:
        return CStoreDestination.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _ae_title(text: str) -> str:
    try:
        return ae_title(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _stow_url(text: str) -> str:
    try:
        return check_stow_url(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _uid_seed(text: str) -> str:
    if not 0 < len(text) <= 128 or not text.isprintable():
        raise argparse.ArgumentTypeError("a UID seed is 1 to 128 printable characters")
    return text


def _sha256(text: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise argparse.ArgumentTypeError(f"'{text}' is not a SHA-256 digest (64 hexadecimal digits)")
    return text.lower()


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What a run is asked for beyond the SDK's paths: the model, sampling, the runtime, Triton, the outputs, DICOM
    and PACS. Each field is declared once, with its environment variable, parser, default and help."""

    model_name: str | None = setting("MEDDPM_MODEL", str, None, "model in the repository (default: the only one there)")
    preset: str | None = setting("MEDDPM_PRESET", str, None, "refuse a model exported for any other preset")
    model_sha256: str | None = setting(
        "MEDDPM_MODEL_SHA256",
        _sha256,
        None,
        "SHA-256 of the trusted model's manifest.json (a run's record.json: model.manifest_sha256): refuse any "
        "other model (the manifest holds the graph's hash: this pins both)",
    )
    scheduler: Scheduler | None = setting(
        "MEDDPM_SCHEDULER",
        _choice(Scheduler, "scheduler"),
        None,
        f"one of {', '.join(Scheduler)} (default: the preset's; the fast path: dpmpp2m-sde)",
    )
    steps: int | None = setting(
        "MEDDPM_STEPS",
        _positive,
        None,
        "denoising steps, i.e. UNet calls (default: the preset's for its "
        "own scheduler, else "
        + ", ".join(f"{k} {v.default_steps}" for k, v in SCHEDULERS.items() if v.default_steps)
        + ")",
    )
    seed: int | None = setting(
        "MEDDPM_SEED",
        _seed,
        None,
        "seed of sample 0; sample i uses seed + i (default: random, recorded)",
    )
    samples: int = setting("MEDDPM_SAMPLES", _positive, 1, "synthetic volumes per mask")
    batch_size: int = setting("MEDDPM_BATCH_SIZE", _positive, 1, "samples sent through the UNet together")
    rescale: tuple[float, float] | None = setting(
        "MEDDPM_RESCALE",
        _rescale,
        None,
        "MIN,MAX: map the model range [-1, 1] linearly onto it",
    )
    threads: int = setting(
        "MEDDPM_THREADS",
        _threads,
        0,
        "threads of the in-process runtime, at most one per core (0: one per core)",
    )
    backend: Backend = setting(
        "MEDDPM_BACKEND",
        _choice(Backend, "backend"),
        Backend.AUTO,
        "runtime of the UNet in process: onnxruntime, openvino, or auto (ONNX Runtime with CUDA on a GPU, "
        "OpenVINO on a CPU)",
    )
    precision: Precision = setting(
        "MEDDPM_PRECISION",
        _choice(Precision, "precision"),
        Precision.AUTO,
        "fp32, bf16, mixed (fp32 at high noise, bf16 below; bf16 and mixed need OpenVINO and a CPU with native "
        "BF16), or auto (on such a CPU, the precision that passed the model's quality gate; else fp32)",
    )
    triton_model: str | None = setting(
        "MEDDPM_TRITON_MODEL",
        str,
        None,
        "served model to call (default: NAME, NAME_openvino or NAME_cpu, the first ready)",
    )
    triton_transport: Transport = setting(
        "MEDDPM_TRITON_TRANSPORT",
        _choice(Transport, "transport"),
        Transport.AUTO,
        "shm: shared memory (same host); "
        "network: tensors in the gRPC messages; auto: shm when the server is on this host and can map it",
    )
    triton_loop: LoopMode = setting(
        "MEDDPM_TRITON_LOOP",
        _choice(LoopMode, "loop mode"),
        LoopMode.CLIENT,
        "client: the app runs the loop, one request per "
        "step; server: the server runs it (NAME_sampler), one request per volume, progress streamed",
    )
    triton_deadline: float = setting(
        "MEDDPM_TRITON_DEADLINE",
        _seconds,
        RetryPolicy.deadline_s,
        "seconds one UNet call "
        "(server-side loop: one step) may take before it is retried (server-side loop: cancelled)",
    )
    triton_retry_window: float = setting(
        "MEDDPM_TRITON_RETRY_WINDOW",
        _seconds,
        RetryPolicy.window_s,
        "seconds to wait for a server that is away (at the start, or restarting mid-run) before giving up",
    )
    output_format: tuple[OutputFormat, ...] = setting(
        "MEDDPM_OUTPUT_FORMAT",
        _output_formats,
        (OutputFormat.NIFTI,),
        "nifti, dicom or nifti,dicom: NIfTI volumes and/or one DICOM MR series per sample and channel",
    )
    segment_map: SegmentMap | None = setting(
        "MEDDPM_SEGMENT_MAP",
        _segment_map,
        None,
        "SEGMENT=LABEL,...: DICOM SEG segments "
        "(number or label) to preset labels, e.g. Brain=1,Tumour=2 (default: segment n is label n)",
    )
    dicom_identity: IdentityPolicy = setting(
        "MEDDPM_DICOM_IDENTITY",
        _choice(IdentityPolicy, "identity policy"),
        IdentityPolicy.PSEUDONYMOUS,
        "pseudonymous: a new patient and study, nothing copied; keep-study: the DICOM mask's patient and study",
    )
    dicom_copy: tuple[str, ...] | None = setting(
        "MEDDPM_DICOM_COPY",
        _keywords,
        None,
        "attributes copied from a DICOM mask into the output (from the list in the README's DICOM section)",
    )
    dicom_uid_seed: str | None = setting(
        "MEDDPM_DICOM_UID_SEED",
        _uid_seed,
        None,
        "TEXT: derive the DICOM UIDs and pseudonym from TEXT, the mask and the sample instead of drawing them, so "
        "that a re-run with the same seeds gives the same identifiers and a PACS stores its series once (not "
        "patient data: e.g. a job ID)",
    )
    pacs_cstore: CStoreDestination | None = setting(
        "MEDDPM_PACS_CSTORE",
        _cstore,
        None,
        "AE@HOST:PORT: send the DICOM series there by C-STORE",
    )
    pacs_calling_ae: str = setting("MEDDPM_PACS_CALLING_AE", _ae_title, "MEDDPM", "our AE title for C-STORE")
    pacs_stow_url: str | None = setting(
        "MEDDPM_PACS_STOW_URL",
        _stow_url,
        None,
        "DICOMweb base URL: send the DICOM series there by STOW-RS (credentials: MEDDPM_DICOMWEB_* variables only)",
    )
    pacs_retries: int = setting(
        "MEDDPM_PACS_RETRIES",
        _count,
        3,
        "retries of a PACS transfer that failed for want of a connection or an answer (pauses 1, 2, 4 ... s, "
        f"at most {PACS_MAX_PAUSE_S:g} s)",
    )
    pacs_timeout: float = setting(
        "MEDDPM_PACS_TIMEOUT",
        _seconds,
        PACS_TIMEOUT_S,
        "seconds a PACS may stay silent (connecting, associating, storing one instance, one read of an HTTP "
        "answer) before the try fails and is retried",
    )
    pacs_deadline: float = setting(
        "MEDDPM_PACS_DEADLINE",
        _seconds,
        PACS_DEADLINE_S,
        "seconds one mask's series may take to reach one PACS, all tries and pauses included; then the mask is "
        "reported as written but not stored",
    )

    def validate(self, preset: Preset, triton_server_netloc: str | None) -> None:
        """ConfigurationError saying what to change when settings contradict each other or the model's preset."""
        if (self.pacs_cstore or self.pacs_stow_url) and OutputFormat.DICOM not in self.output_format:
            raise ConfigurationError(
                "a PACS destination is set but the output format has no dicom; add "
                "--output-format nifti,dicom (MEDDPM_OUTPUT_FORMAT)"
            )
        if self.triton_loop == LoopMode.SERVER and not triton_server_netloc:
            raise ConfigurationError(
                "--triton-loop server needs a Triton server: set TRITON_SERVER_NETLOC or "
                "--triton-server-netloc HOST:PORT, or drop --triton-loop"
            )
        if self.segment_map:
            self.segment_map.check(preset)


SETTINGS = tuple(Setting(f.name, default=f.default, **f.metadata) for f in dataclasses.fields(RunSettings))


def parse_settings(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> tuple[RunSettings, list[str]]:
    """Settings from flags and environment; returns them with the arguments left for the SDK."""
    parser = argparse.ArgumentParser(add_help=False)
    values = {}
    for known in SETTINGS:
        parser.add_argument(known.flag, dest=known.name, type=known.type, default=None, help=known.help)
    args, rest = parser.parse_known_args(list(argv))
    for known in SETTINGS:
        value = getattr(args, known.name)
        if value is None and known.env in environ:
            try:
                value = known.type(environ[known.env])
            except (argparse.ArgumentTypeError, ValueError) as error:
                raise ConfigurationError(f"{known.env}={environ[known.env]!r}: {error}") from None
        values[known.name] = known.default if value is None else value
    return RunSettings(**values), rest


def settings_help() -> str:
    """The table, for --help and the README."""
    lines = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        lines.append(f"| `{s.flag}` | `{s.env}` | {_shown(s.default)} | {s.help} |")
    return "\n".join(lines)


def help_text() -> str:
    return USAGE + settings_help()


def _shown(default: Any) -> str:
    if default is None:
        return "-"
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
