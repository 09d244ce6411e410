"""Writing outputs so that a reader sees the old version or the new one, never half of either, and never neither;
and replacing only what the app wrote.

A folder is filled under a hidden staging name beside its target (`.NAME.partial-*`), locked by its writer, and
swapped into place by one atomic exchange of the two names (Linux renameat2 RENAME_EXCHANGE): at every moment
the target is the old version or the new one. The old version comes back under the staging name and is removed.
File systems without renameat2's flags (NFS) get two renames instead, logged.

Every folder written so carries the app's mark, OWNER_MARK: who writes it (host, process, start) and, once
complete, the files it holds. The mark decides what may be removed:
- an existing target is replaced only when each of its files is one its mark lists (or is empty): a folder of
  the user's, or one the user added files to, is refused, naming the files;
- a staging folder left by a writer that is gone (killed, crashed) is removed by the next writer beside it only when
  it carries the mark of a writer on this host whose lock is free (or is empty but for an unfinished mark); a folder
  that merely has such a name is left alone, and so is one from another host, whose writer cannot be checked from
  here (logged). Marks are written whole and removed last, so a writer killed at any moment leaves a folder that is
  still recognisably the app's;
- two writers of one target at once (two runs, or two pods on shared storage): the one that started first writes,
  the other is refused, so that neither overwrites the other unnoticed.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from meddpm.errors import OutputError
from meddpm.regular_files import read_regular

STAGING_MARK = ".partial-"
OWNER_MARK = ".meddpm-output.json"  # in every folder the app writes: its writer, then its files
OWNER_MARK_BYTES = 4 * 2**20  # a mark is read only up to this size
_WRITTEN_BY = "meddpm-deploy"
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
_libc = ctypes.CDLL(None, use_errno=True)
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Writer:
    """Who writes a folder: enough to tell whether that writer may still be alive, and which of two came first."""

    host: str
    pid: int
    started_ns: int

    @classmethod
    def this_process(cls) -> Writer:
        return cls(socket.gethostname(), os.getpid(), time.time_ns())

    @property
    def local(self) -> bool:
        return self.host == socket.gethostname()

    def __str__(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_ns / 1e9))
        return f"process {self.pid} on host {self.host}, started {started}"


@dataclasses.dataclass(frozen=True)
class OwnerMark:
    """The content of OWNER_MARK: the writer, and the files (relative POSIX paths) once the folder is complete."""

    writer: Writer
    files: tuple[str, ...] | None = None  # None while the folder is being written

    def write(self, folder: Path) -> None:
        """Write the mark whole: a writer killed meanwhile leaves the previous mark, or none and a temporary file."""
        data = {"written_by": _WRITTEN_BY, "writer": dataclasses.asdict(self.writer), "files": self.files}
        write_text(folder / OWNER_MARK, json.dumps(data, indent=1) + "\n")

    @classmethod
    def read(cls, folder: Path) -> OwnerMark | None:
        """The folder's mark, or None when it has none, or not one the app wrote."""
        try:
            # A mark cut short by the bound is not JSON: not a mark.
            data = json.loads(read_regular(folder / OWNER_MARK, OWNER_MARK_BYTES, follow_symlinks=False))
            if data.get("written_by") != _WRITTEN_BY:
                return None
            files = data["files"]
            return cls(
                Writer(str(data["writer"]["host"]), int(data["writer"]["pid"]), int(data["writer"]["started_ns"])),
                None if files is None else tuple(str(f) for f in files),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A folder to fill beside `target`; on success it replaces `target` whole, on error it is removed. A target
    the app did not write, or one another live writer is writing, is refused (OutputError)."""
    check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target.parent)
    staging, lock, writer = _locked_staging_folder(target)
    try:
        _refuse_earlier_writer(target, staging, writer)
        try:
            yield staging
        except OSError as error:
            if error.errno not in WRITE_ERRORS:
                raise
            raise OutputError(
                f"{error.filename or target}: cannot be written ({error.strerror}); free space, or "
                f"write to another folder"
            ) from None
        OwnerMark(writer, _files_of(staging)).write(staging)
        check_target(target)  # the user may have put files there while this writer worked
        _refuse_earlier_writer(target, staging, writer)
        _swap_into_place(staging, target)
    finally:
        os.close(lock)
        _remove_marked_folder(staging)  # the old version, or the unfinished new one


def check_target(target: Path) -> None:
    """Refuse a target the swap may not replace: a symbolic link, a file, or a folder holding files the app did not
    write there."""
    if target.is_symlink():
        raise OutputError(
            f"{target}: is a symbolic link; outputs are replaced whole and links are neither followed "
            f"nor removed: remove the link, or write to another folder"
        )
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder; move it away, or write to another folder")
    if target.is_dir():
        foreign = foreign_files(target)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise OutputError(
                f"{target}: holds files this app did not write there ({shown}), and its output would replace the "
                f"folder whole; move them (or the folder) away, or write to another output folder (-o)"
            )


def foreign_files(folder: Path, limit: int = 3) -> list[str]:
    """Up to `limit`+1 entries of `folder` that its owner mark does not list, walked without recursion: non-empty
    files, links, devices; all of them when the folder has no mark. Empty files and folders carry no data."""
    mark = OwnerMark.read(folder)
    listed = set(mark.files or ()) if mark else set()
    budget = len(listed) + 1000  # a folder the app wrote holds its listed files; more is not the app's
    found: list[str] = []
    pending = [Path()]
    while pending and len(found) <= limit:
        relative = pending.pop()
        try:
            entries = list(os.scandir(folder / relative))
        except OSError:
            found.append(f"{relative.as_posix()}/ (unreadable)")
            continue
        for entry in entries:
            budget -= 1
            if budget < 0:
                return [*found, "more entries than the app wrote"]
            name = (relative / entry.name).as_posix()
            if entry.is_dir(follow_symlinks=False):
                pending.append(relative / entry.name)
            elif name == OWNER_MARK and mark:
                continue
            elif name not in listed and not (entry.is_file(follow_symlinks=False) and entry.stat().st_size == 0):
                found.append(name)
    return found


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
    """Remove the staging folders of writers on this host that are gone (killed or crashed); returns their names.
    Only folders carrying the app's mark are removed, and only when their writer's lock is free."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if not (entry.name.startswith(".") and STAGING_MARK in entry.name and entry.is_dir(follow_symlinks=False)):
                continue
            path = Path(entry.path)
            mark = OwnerMark.read(path)
            if mark is not None and not mark.writer.local:
                log.warning(
                    "%s: left by %s, which cannot be checked from here; if no run there writes it, remove it",
                    path,
                    mark.writer,
                )
                continue
            with _lock_if_free(path) as free:  # held while removing: a writer that takes it next finds it gone
                # A writer killed before its first mark was in place left the folder empty, or holding only the
                # mark's temporary file; any other folder without the mark is not the app's.
                if free and (mark is not None or _holds_only_unfinished_marks(path)):
                    _remove_marked_folder(path)
                    removed.append(entry.name)
    return removed


def _holds_only_unfinished_marks(folder: Path) -> bool:
    unfinished = _temporary_name(folder / OWNER_MARK)
    try:
        return all(entry.name.startswith(unfinished) for entry in os.scandir(folder))
    except OSError:
        return False


def _remove_marked_folder(folder: Path) -> None:
    """Remove a folder the app wrote, its mark last: a removal cut short leaves a folder still known as the app's."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            elif entry.name != OWNER_MARK:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
    (folder / OWNER_MARK).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def write_text(path: Path, text: str) -> None:
    """Write a file whole: a reader sees the old text or the new one."""
    tmp = path.with_name(f"{_temporary_name(path)}{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _temporary_name(path: Path) -> str:
    """The start of the name write_text gives the file it fills before putting it at `path`."""
    return f".{path.name}.tmp-"


def _locked_staging_folder(target: Path) -> tuple[Path, int, Writer]:
    """A new staging folder carrying this writer's mark, and a lock on it, held until the writer closes it (or dies)."""
    while True:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_MARK}", dir=target.parent))
        try:
            lock = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:  # removed as a leftover before we could lock it
            continue
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.fstat(lock).st_nlink > 0:  # not removed as a leftover between mkdtemp and flock
            staging.chmod(0o755)  # mkdtemp makes it private; the result must be readable like any output
            writer = Writer.this_process()
            OwnerMark(writer).write(staging)
            return staging, lock, writer
        os.close(lock)


def _refuse_earlier_writer(target: Path, own: Path, writer: Writer) -> None:
    """Refuse to write `target` while another live writer that started first writes it (on this host: its lock is
    held; on another host, e.g. a pod on shared storage, it cannot be checked, so it counts as alive)."""
    prefix = f".{target.name}{STAGING_MARK}"
    for entry in os.scandir(target.parent):
        if not entry.name.startswith(prefix) or entry.name == own.name or not entry.is_dir(follow_symlinks=False):
            continue
        other = OwnerMark.read(Path(entry.path))
        if other is None or other.files is not None:  # not the app's, or an old version on its way out
            continue
        if (other.writer.started_ns, entry.name) > (writer.started_ns, own.name):
            continue
        if other.writer.local:
            with _lock_if_free(Path(entry.path)) as free:
                if free:
                    continue
        raise OutputError(
            f"{target}: another run ({other.writer}) is writing it; give this run another output folder (-o), or, "
            f"if that run is gone, remove {entry.path}"
        )


def _files_of(folder: Path) -> tuple[str, ...]:
    """The files a writer put in its staging folder, as relative POSIX paths."""
    return tuple(
        sorted(
            (Path(root, name).relative_to(folder)).as_posix()
            for root, _, files in os.walk(folder)
            for name in files
            if Path(root, name) != folder / OWNER_MARK
        )
    )


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
