"""Writing outputs so that a reader sees the old version or the new one, never half of either."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_folder(staging: Path, target: Path) -> None:
    """Swap a finished staging folder into place (a previous `target` is replaced whole)."""
    if target.exists():
        retired = target.with_name(f".{target.name}.retired-{os.getpid()}")
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired)
    else:
        os.replace(staging, target)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)

