"""The sampling core: the code the server-side loop runs inside Triton, and nothing more.

`python -m export` copies these files of the `meddpm` package beside the `<name>_sampler` model.py and records
their tree hash and version in the manifest. Before a server-side run the client compares that hash with its own
copy of the same files: the two loops give the same volumes only when they are the same code.
"""

from __future__ import annotations

from pathlib import Path

from meddpm.model.manifest import tree_sha256

PACKAGE = Path(__file__).resolve().parents[1]  # the `meddpm` folder
FILES = (  # relative to PACKAGE; tests/unit/test_sampling.py imports the loop from a copy of these alone
    "__init__.py",
    "errors.py",
    "choices.py",
    "regular_files.py",
    "model/__init__.py",
    "model/presets.py",
    "model/tensors.py",
    "model/manifest.py",
    "sampling/__init__.py",
    "sampling/sampler_files.py",
    "sampling/denoiser.py",
    "sampling/loop.py",
    "sampling/protocol.py",
    "sampling/request.py",
    "sampling/schedulers.py",
)


def code_sha256() -> str:
    """Tree hash of this installation's sampling core, as the manifest records the exported copy's."""
    return tree_sha256(PACKAGE, FILES)
