"""Writing outputs so that a reader sees the old version or the new one, never half of either, and never neither.

A folder is filled under a hidden staging name beside its target (`.NAME.partial-*`), locked by its writer, and
swapped into place by one atomic exchange of the two names (Linux renameat2 RENAME_EXCHANGE): at every moment
the target is the old version or the new one, whatever the number of writers and wherever one is killed. The old
version comes back under the staging name and is removed. What a killed writer leaves (its staging folder, or an
old version it had not yet removed) is unlocked, and the next write into the same folder removes it. File systems
without renameat2's flags (NFS) get two renames instead, logged.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from meddpm.errors import OutputError

STAGING_MARK = ".partial-"
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
_libc = ctypes.CDLL(None, use_errno=True)
log = logging.getLogger(__name__)


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A folder to fill beside `target`; on success it replaces `target` whole, on error it is removed."""
    check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target.parent)
    staging, lock = _locked_staging_folder(target)
    try:
        try:
            yield staging
        except OSError as error:
            if error.errno not in WRITE_ERRORS:
                raise
            raise OutputError(
                f"{error.filename or target}: cannot be written ({error.strerror}); free space, or "
                f"write to another folder"
            ) from None
        _swap_into_place(staging, target)
    finally:
        os.close(lock)
        shutil.rmtree(staging, ignore_errors=True)  # the old version, or the unfinished new one


def check_target(target: Path) -> None:
    """Refuse a target that is not a folder the swap may replace: a symbolic link, or a file."""
    if target.is_symlink():
        raise OutputError(
            f"{target}: is a symbolic link; outputs are replaced whole and links are neither followed "
            f"nor removed: remove the link, or write to another folder"
        )
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder; move it away, or write to another folder")


def check_writable(folder: Path) -> None:
    """Refuse, before any work, an output folder that cannot be made or written into."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=folder))
    except OSError as error:
        raise unwritable_folder(folder, error) from None


def unwritable_folder(folder: Path | str, error: OSError) -> OutputError:
    return OutputError(
        f"{folder}: cannot write outputs there ({error.strerror}); choose a writable output folder "
        f"(-o, HOLOSCAN_OUTPUT_PATH)"
    )


def remove_leftovers(folder: Path) -> list[str]:
    """Remove the staging folders of writers that are gone (killed or crashed); returns their names."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if entry.name.startswith(".") and STAGING_MARK in entry.name and entry.is_dir(follow_symlinks=False):
                with _lock_if_free(Path(entry.path)) as free:
                    if free:  # held while removing: a writer that takes it next finds its folder gone, and retries
                        shutil.rmtree(entry.path, ignore_errors=True)
                        removed.append(entry.name)
    return removed


def write_text(path: Path, text: str) -> None:
    """Write a file whole: a reader sees the old text or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _locked_staging_folder(target: Path) -> tuple[Path, int]:
    """A new staging folder and a lock on it, held until the writer closes it (or dies)."""
    while True:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_MARK}", dir=target.parent))
        try:
            lock = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:  # removed as a leftover before we could lock it
            continue
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.fstat(lock).st_nlink > 0:  # not removed as a leftover between mkdtemp and flock
            staging.chmod(0o755)  # mkdtemp makes it private; the result must be readable like any output
            return staging, lock
        os.close(lock)


@contextlib.contextmanager
def _lock_if_free(folder: Path) -> Iterator[bool]:
    """Take the folder's lock if no live writer holds it; yields whether it was taken."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield False
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        yield False
        return
    try:
        yield True
    finally:
        os.close(descriptor)


def _swap_into_place(staging: Path, target: Path) -> None:
    """Put `staging` at `target` in one atomic step; an old `target` ends up at `staging`."""
    while True:
        try:
            if _rename(staging, target, _RENAME_NOREPLACE) or _rename(staging, target, _RENAME_EXCHANGE):
                return
        except _NoAtomicSwap:
            _swap_in_two_steps(staging, target)
            return
        # the target vanished between the two calls (another writer's exchange cannot remove it): try again


class _NoAtomicSwap(Exception):
    """The file system (e.g. NFS) has no renameat2 flags."""


def _rename(source: Path, target: Path, flags: int) -> bool:
    """renameat2(2); False when the target's existence does not allow it (EEXIST for NOREPLACE, ENOENT for EXCHANGE)."""
    if not hasattr(_libc, "renameat2"):
        raise _NoAtomicSwap
    if _libc.renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    error = ctypes.get_errno()
    if (flags, error) in ((_RENAME_NOREPLACE, errno.EEXIST), (_RENAME_EXCHANGE, errno.ENOENT)):
        return False
    if error in (errno.EINVAL, errno.ENOSYS):
        raise _NoAtomicSwap
    raise OutputError(
        f"{target}: cannot be put in place ({os.strerror(error)}); check the output folder's permissions and free space"
    )


def _swap_in_two_steps(staging: Path, target: Path) -> None:
    """Where renameat2's flags are missing: the old version moves aside, then the new one into place. A kill between
    the two renames leaves the old version as `.NAME.retired-*` (never removed unasked) and no target."""
    log.warning("%s: the file system cannot swap folders atomically; replacing in two renames", target.parent)
    retired = staging.with_name(staging.name.replace(STAGING_MARK, ".retired-", 1))
    with contextlib.suppress(FileNotFoundError):
        os.rename(target, retired)
    os.rename(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
