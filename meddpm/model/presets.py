"""Model presets: typed views of `presets.toml` (and of user preset files)."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any

from meddpm.choices import parse_choice
from meddpm.errors import ConfigurationError

BUILTIN_PRESETS = Path(__file__).with_name("presets.toml")


class ConditionScale(StrEnum):
    """How one-hot condition channels are scaled: -1/+1 or 0/1."""

    SYMMETRIC = "symmetric"
    BINARY = "binary"


class AxisOrder(StrEnum):
    """ "reversed" feeds nibabel's (X, Y, Z) to the network as (Z, Y, X); "as-is" does not."""

    REVERSED = "reversed"
    AS_IS = "as-is"


class Scheduler(StrEnum):
    """The sampling schedulers, by name; each one's build and default steps are in meddpm.sampling.schedulers."""

    DDPM = "ddpm"
    DDIM = "ddim"
    DPMPP2M = "dpmpp2m"
    DEIS = "deis"
    DPMPP2M_SDE = "dpmpp2m-sde"


class Precision(StrEnum):
    """The precision the UNet runs at in process (meddpm.backends)."""

    AUTO = "auto"  # the preset's gated_precision on a CPU with native BF16 and OpenVINO, else fp32
    FP32 = "fp32"
    BF16 = "bf16"  # OpenVINO, on a CPU with native BF16 (AMX or AVX512-BF16)
    MIXED = (
        "mixed"  # fp32 at high noise (meddpm.backends.options.step_precision), where errors are amplified; bf16 below
    )


# Keys of a preset table whose values are one of an option set.
_CHOICES: dict[str, type[StrEnum]] = {
    "scale": ConditionScale,
    "axis_order": AxisOrder,
    "default_scheduler": Scheduler,
    "gated_precision": Precision,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    model_channels: int
    num_res_blocks: int
    channel_mult: tuple[int, ...]
    attention_factors: tuple[int, ...]
    norm_groups: int = 32

    @property
    def downsample_factor(self) -> int:
        """Each side of the network grid must be a multiple of this."""
        return 2 ** (len(self.channel_mult) - 1)


@dataclasses.dataclass(frozen=True)
class ConditionConfig:
    labels: tuple[int, ...]
    scale: ConditionScale


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    channels: tuple[str, ...]
    grid: tuple[int, int, int]
    voxel_size_mm: tuple[float, float, float]
    orientation: str
    axis_order: AxisOrder
    background: float = -1.0  # the training images' background intensity: the image where the network grid ends

    @property
    def mask_shape(self) -> tuple[int, int, int]:
        """The grid in the mask's own (X, Y, Z) axis order."""
        return self.grid[::-1] if self.axis_order == AxisOrder.REVERSED else self.grid


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    timesteps: int
    beta_schedule: str
    default_scheduler: Scheduler
    default_steps: int
    # Below this alpha-bar the loop takes the mask's prior image as the clean-image estimate and makes no UNet call
    # (meddpm/sampling/loop.py, `mask_prior`); 0: every step calls the UNet, as Med-DDPM samples.
    mask_prior_alpha_bar: float = 0.0


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    unet: UNetConfig
    condition: ConditionConfig
    image: ImageConfig
    schedule: ScheduleConfig
    # What `--precision auto` runs on a CPU with native BF16: the cheapest precision whose quality gate
    # (benchmarks/precision_gate.py) passed on the weights this preset ships with; fp32 where none was measured.
    gated_precision: Precision = Precision.FP32

    @property
    def in_channels(self) -> int:
        return len(self.image.channels) + len(self.condition.labels)

    @property
    def out_channels(self) -> int:
        return len(self.image.channels)

    @property
    def condition_channels(self) -> int:
        return len(self.condition.labels)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, name: str, table: dict[str, Any], source: str = "presets") -> Preset:
        """Build and validate a preset from its TOML table (or a manifest's copy of it)."""
        try:
            preset = cls(
                name=name,
                description=str(table.get("description", "")),
                unet=_build(UNetConfig, table["unet"]),
                condition=_build(ConditionConfig, table["condition"]),
                image=_build(ImageConfig, table["image"]),
                schedule=_build(ScheduleConfig, table["schedule"]),
                gated_precision=parse_choice(
                    Precision, str(table.get("gated_precision", Precision.FP32)), "value of gated_precision"
                ),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigurationError(
                f"{source}: preset '{name}' is incomplete or malformed ({error!r}); "
                f"copy a complete table from {BUILTIN_PRESETS} and edit it"
            ) from None
        preset._validate(source)
        return preset

    def _validate(self, source: str) -> None:
        where = f"{source}: preset '{self.name}'"
        checks = [
            (
                len(self.image.grid) == 3 and len(self.image.voxel_size_mm) == 3,
                "image.grid and voxel_size_mm need 3 values",
            ),
            (
                all(side % self.unet.downsample_factor == 0 for side in self.image.grid),
                f"every side of image.grid must be a multiple of {self.unet.downsample_factor} (2 ** (levels - 1))",
            ),
            (
                0 not in self.condition.labels and len(set(self.condition.labels)) == len(self.condition.labels),
                "condition.labels must be distinct and must not include the background label 0",
            ),
            (
                all(c % self.unet.norm_groups == 0 for c in _norm_channels(self.unet)),
                f"model_channels * channel_mult must be divisible by norm_groups ({self.unet.norm_groups})",
            ),
            (len(self.image.orientation) == 3, "image.orientation needs three axis codes such as 'RAS'"),
            (self.gated_precision != Precision.AUTO, "gated_precision is fp32, bf16 or mixed: what auto resolves to"),
            (
                0.0 <= self.schedule.mask_prior_alpha_bar < 1.0,
                "schedule.mask_prior_alpha_bar is an alpha-bar: at least 0 (off) and under 1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigurationError(f"{where}: {message}")


def _norm_channels(unet: UNetConfig) -> list[int]:
    return [unet.model_channels * m for m in unet.channel_mult]


def _build(kind: type, table: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = set(table) - set(fields)
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in [{kind.__name__}]; known keys: {sorted(fields)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    for key, choices in _CHOICES.items():
        if key in values:
            values[key] = parse_choice(choices, str(values[key]), f"value of {key}")
    return kind(**values)


def load_presets(extra_file: str | os.PathLike | None = None) -> dict[str, Preset]:
    """The built-in presets, plus those of `extra_file` or $MEDDPM_PRESETS (which may override)."""
    presets = _read_file(BUILTIN_PRESETS)
    extra = extra_file or os.environ.get("MEDDPM_PRESETS")
    if extra:
        presets.update(_read_file(Path(extra)))
    return presets


def get_preset(name: str, extra_file: str | os.PathLike | None = None) -> Preset:
    presets = load_presets(extra_file)
    if name not in presets:
        raise ConfigurationError(f"unknown preset '{name}'; known presets: {', '.join(sorted(presets))}")
    return presets[name]


def _read_file(path: Path) -> dict[str, Preset]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise ConfigurationError(f"cannot read preset file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigurationError(f"preset file {path} is not valid TOML: {error}") from None
    tables = data.get("presets")
    if not isinstance(tables, dict) or not tables:
        raise ConfigurationError(f"preset file {path} has no [presets.NAME] tables")
    return {name: Preset.from_dict(name, table, source=str(path)) for name, table in tables.items()}
