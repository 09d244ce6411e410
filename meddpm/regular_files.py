"""Bounded reads of files that must be regular: a FIFO, device or folder in their place is refused unread."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def read_regular(path: Path, limit: int, *, follow_symlinks: bool = True) -> bytes:
    """At most `limit` bytes of the regular file `path`; OSError (EINVAL for a FIFO, device or folder) otherwise.
    The file is opened non-blocking, so that a FIFO never holds up the open."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    with os.fdopen(os.open(path, flags), "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or folder)", str(path))
        return file.read(limit)
