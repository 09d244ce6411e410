"""Bounded reads of files that must be regular: a FIFO, device or folder in their place is refused unread."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class NotRegularFile(OSError):
    """A FIFO, device or folder where a regular file must be."""


def read_regular(path: Path, limit: int, *, follow_symlinks: bool = True) -> bytes:
    """At most `limit` bytes of the regular file `path`; NotRegularFile, or the OSError of opening or reading it.
    The file is opened non-blocking, so that a FIFO never holds up the open."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    with os.fdopen(os.open(path, flags), "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file (a FIFO, device or folder)", str(path))
        return file.read(limit)
