"""The manifest `python -m export` writes into every version folder: what was exported, and the hashes that prove it.

`Manifest` is the one definition of the file: the export builds one, the app, the Triton client and the
server-side loop read it with `Manifest.read`, never by string keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from meddpm import regular_files
from meddpm.errors import ModelError
from meddpm.model.presets import Preset

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 4  # 4: the graph's size recorded; 3: the sampler's code is the sampling core alone, its files listed
MANIFEST_BYTES = 1 << 20  # a manifest is a few kB: a larger file is not one
# The export's hashes in each entry's config.pbtxt `parameters` (what a client can ask a server for): the ONNX
# graph a UNet entry serves (for _trt, the graph its plan was built from), and the sampler's copy of the sampling
# core; each is the `sha256` of a manifest record.
ONNX_SHA256, PACKAGE_SHA256 = "onnx_sha256", "package_sha256"
SAMPLER_PACKAGE = "meddpm"  # the folder beside the sampler's model.py that holds the sampling core


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
    file: str
    sha256: str
    layout: str  # "ema", "model" or "bare" (meddpm.model.checkpoint)
    schedule_checked: bool


@dataclasses.dataclass(frozen=True)
class GraphRecord:
    file: str
    sha256: str
    size: int  # bytes: a read of the file stops there, before it is hashed
    opset: int
    inputs: tuple[str, ...]
    output: str
    grid_multiple: int  # each side of the grid must be a multiple of this


@dataclasses.dataclass(frozen=True)
class SamplerCodeRecord:
    """The sampling core copied beside the sampler's model.py (meddpm.sampling.sampler_files)."""

    folder: str
    sha256: str  # tree hash of `files` (sha256_of)
    files: tuple[str, ...]
    version: str  # meddpm-deploy's version that exported it


@dataclasses.dataclass(frozen=True)
class Manifest:
    preset: Preset
    checkpoint: CheckpointRecord
    onnx: GraphRecord
    sampler_package: SamplerCodeRecord
    verification: dict[str, Any]  # export.onnx_graph.Verification.to_dict(): tolerance, errors, cases, passed
    versions: dict[str, str]  # package versions that made the export
    created: str
    triton_model: str = ""  # the repository entry this copy lies in

    @property
    def verification_passed(self) -> bool:
        return bool(self.verification["passed"])

    def to_dict(self) -> dict[str, Any]:
        return {"format": MANIFEST_FORMAT, **dataclasses.asdict(self)}

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """The manifest at `path`; ModelError saying to re-export when it is missing, older or malformed."""
        return cls.parse(read_regular(path, MANIFEST_BYTES, "manifest"), path)

    @classmethod
    def parse(cls, text: bytes, path: Path) -> Manifest:
        """The manifest read from `path` (named in the ModelError)."""
        try:
            if len(text) > MANIFEST_BYTES:
                raise ValueError(f"more than {MANIFEST_BYTES} bytes")
            data = json.loads(text)
            if data.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {MANIFEST_FORMAT}")
            preset = data["preset"]
            return cls(
                preset=Preset.from_dict(preset["name"], preset, source=str(path)),
                checkpoint=_record(CheckpointRecord, data["checkpoint"]),
                onnx=_record(GraphRecord, data["onnx"]),
                sampler_package=_record(SamplerCodeRecord, data["sampler_package"]),
                verification=_verification(data["verification"]),
                versions=dict(data["versions"]),
                created=str(data["created"]),
                triton_model=str(data.get("triton_model", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ModelError(f"{path}: unreadable manifest ({error}); re-run `python -m export`") from None


def _verification(values: dict[str, Any]) -> dict[str, Any]:
    """The export's verification: `passed` a boolean, the tolerance and errors finite numbers, its cases a list."""
    if not isinstance(values.get("passed"), bool):
        raise TypeError(f"verification 'passed' is {values.get('passed')!r}, not true or false")
    for key in ("tolerance", "max_abs_error", "max_relative_error"):
        value = values.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise TypeError(f"verification {key!r} is {value!r}, not a finite number")
    if not isinstance(values.get("cases"), list) or not values["cases"]:
        raise TypeError("verification 'cases' is not a list of the cases run")
    return dict(values)


def _record(kind: type, values: dict[str, Any]) -> Any:
    """A record from its JSON object: every field present, sha256 a string, size a count, lists as tuples."""
    fields = {f.name for f in dataclasses.fields(kind)}
    if "sha256" in fields and not isinstance(values.get("sha256"), str):
        raise TypeError(f"{kind.__name__} sha256 is not a string")
    if "size" in fields and not (type(values.get("size")) is int and values["size"] >= 0):
        raise TypeError(f"{kind.__name__} size is not a number of bytes")
    return kind(**{name: tuple(values[name]) if isinstance(values[name], list) else values[name] for name in fields})


def read_regular(path: Path, limit: int, what: str) -> bytes:
    """The first `limit` + 1 bytes of the regular file `path` (more than `limit`: the caller refuses it); ModelError
    for anything else. A FIFO or device is refused unread: opened non-blocking, a FIFO never holds the open up."""
    try:
        return regular_files.read_regular(path, limit + 1)
    except regular_files.NotRegularFile:
        raise ModelError(
            f"{path}: the {what} is not a regular file (a FIFO, device or folder); re-run `python -m export`"
        ) from None
    except OSError as error:
        raise ModelError(f"{path}: cannot read the {what} ({error.strerror}); re-run `python -m export`") from None


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, or of a folder as a tree: each file's relative path and hash, sorted by path
    (__pycache__ left out: Python writes it where the package runs)."""
    if not path.is_dir():
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    files = [
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and "__pycache__" not in p.relative_to(path).parts
    ]
    return tree_sha256(path, files)


def tree_sha256(root: Path, files: Iterable[str]) -> str:
    """SHA-256 of the files named (relative to `root`) as a tree; equal to sha256_of a folder holding just them."""
    return hashlib.sha256("".join(f"{name}\0{sha256_of(root / name)}\n" for name in sorted(files)).encode()).hexdigest()
