"""The output swap: old or new, never half and never neither, with any number of writers and any of them killed."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from meddpm.errors import OutputError
from meddpm.output_folders import OWNER_MARK, OwnerMark, Writer, remove_leftovers, staged_folder
from tests.conftest import REPO

# A writer that swaps versions of one folder into place until killed; each version holds two files with one token.
# While another writer that started first is writing, it is refused, and tries again.
WRITER = """
import sys, uuid
from pathlib import Path
from meddpm.output_folders import staged_folder
from meddpm.errors import OutputError
target, swaps = Path(sys.argv[1]), int(sys.argv[2])
written = refused = 0
while written < swaps:
    try:
        with staged_folder(target) as staging:
            token = uuid.uuid4().hex
            (staging / "a").write_text(token)
            (staging / "b").write_text(token)
        written += 1
    except OutputError as error:
        assert "another run" in str(error), error
        refused += 1
print("done", written, refused, flush=True)
"""

# A writer that fills its staging folder and then waits, holding it, until killed.
HOLDER = """
import sys, time
from pathlib import Path
from meddpm.output_folders import staged_folder
with staged_folder(Path(sys.argv[1])) as staging:
    (staging / "a").write_text("unfinished")
    print("holding", flush=True)
    time.sleep(600)
"""


def start(script, *args):
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def version(target: Path) -> str | None:
    """The token of the version in place; fails on a missing or half version. Both files are read through one
    handle on the folder, so that a swap between the two reads cannot mix versions; None when the version read was
    replaced meanwhile and is being removed (a reader's files vanish under it, as with any replaced output)."""
    folder = os.open(target, os.O_RDONLY | os.O_DIRECTORY)  # raises when no version is in place
    try:
        a, b = (Path(f"/proc/self/fd/{folder}/{name}").read_text() for name in ("a", "b"))
    except FileNotFoundError:
        if os.fstat(folder).st_ino == os.stat(target).st_ino:
            raise AssertionError("a version without both files is in place") from None
        return None  # replaced since it was opened, and being removed
    finally:
        os.close(folder)
    assert a == b, "a half-written version is visible"
    return a


def write_version(target: Path, token: str) -> None:
    with staged_folder(target) as staging:
        (staging / "a").write_text(token)
        (staging / "b").write_text(token)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


class Reader(threading.Thread):
    """Reads the target over and over; records anything but a whole version."""

    def __init__(self, target: Path):
        super().__init__(daemon=True)
        self.target, self.reads, self.failures, self.running = target, 0, [], True

    def run(self):
        while self.running:
            try:
                version(self.target)
                self.reads += 1
            except (OSError, AssertionError) as error:
                self.failures.append(repr(error))


def test_concurrent_writers_always_leave_one_whole_version_in_place(tmp_path):
    target = tmp_path / "out" / "subj"
    write_version(target, "first")
    reader = Reader(target)
    reader.start()
    writers = [start(WRITER, target, 150) for _ in range(4)]
    results = [writer.communicate(timeout=600) for writer in writers]
    reader.running = False
    reader.join()
    assert [w.returncode for w in writers] == [0] * 4, [err[-2000:] for _, err in results]
    assert reader.failures == [] and reader.reads > 0
    assert sum(int(out.split()[2]) for out, _ in results) > 0, "no writer was ever refused: nothing was concurrent"
    assert version(target) != "first" and leftovers(target.parent) == []


def test_writers_killed_at_any_moment_leave_a_whole_version_and_their_leftovers_are_removed(tmp_path):
    target = tmp_path / "out" / "subj"
    write_version(target, "first")
    reader = Reader(target)
    reader.start()
    for delay in (0.3, 0.6, 0.9, 1.2):  # several rounds of writers killed mid-swap, at different moments
        writers = [start(WRITER, target, 10**6) for _ in range(3)]
        time.sleep(delay)
        for writer in writers:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
    reader.running = False
    reader.join()
    assert reader.failures == [] and reader.reads > 0
    version(target)
    write_version(target, "last")  # the next write removes what the killed writers left
    assert version(target) == "last" and leftovers(target.parent) == []


def test_a_live_writers_staging_folder_is_not_taken_for_a_leftover(tmp_path):
    target = tmp_path / "subj"
    holder = start(HOLDER, target)
    try:
        assert holder.stdout.readline() == "holding\n"
        assert remove_leftovers(tmp_path) == [] and len(leftovers(tmp_path)) == 1
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert len(remove_leftovers(tmp_path)) == 1 and leftovers(tmp_path) == []
    finally:
        holder.kill()


@pytest.mark.parametrize("kind", ["link", "file"])
def test_a_target_that_is_a_link_or_a_file_is_refused_and_left_alone(tmp_path, kind):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("precious")
    target = tmp_path / "out" / "subj"
    target.parent.mkdir()
    if kind == "link":
        target.symlink_to(elsewhere)
    else:
        target.write_text("a file")
    with pytest.raises(OutputError, match="symbolic link|is not a folder"), staged_folder(target):
        pass
    assert (elsewhere / "keep").read_text() == "precious" and leftovers(target.parent) == []
    assert target.is_symlink() if kind == "link" else target.read_text() == "a file"


def test_a_full_disk_is_named_and_nothing_is_left_behind(tmp_path):
    target = tmp_path / "subj"
    with pytest.raises(OutputError, match=r"big.bin: cannot be written \(No space left on device\); free space"):
        with staged_folder(target) as staging:
            raise OSError(errno.ENOSPC, "No space left on device", str(staging / "big.bin"))
    assert not target.exists() and leftovers(tmp_path) == []


def test_a_folder_the_app_did_not_write_is_refused_and_left_whole(tmp_path):
    target = tmp_path / "phantom_00"
    target.mkdir()
    (target / "raw_T1.txt").write_text("the user's")
    with pytest.raises(OutputError, match=r"phantom_00: holds files this app did not write there \(raw_T1.txt\)"):
        write_version(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phantom_00"]
    assert (target / "raw_T1.txt").read_text() == "the user's"


def test_an_output_the_user_added_a_file_to_is_refused_until_it_is_moved_away(tmp_path):
    target = tmp_path / "subj"
    write_version(target, "first")
    assert OwnerMark.read(target).files == ("a", "b")
    (target / "empty").touch()  # an empty file carries no data: no reason to refuse
    write_version(target, "second")
    (target / "notes" / "deep").mkdir(parents=True)
    (target / "notes" / "deep" / "thesis.txt").write_text("precious")
    with pytest.raises(OutputError, match=r"notes/deep/thesis.txt"):
        write_version(target, "third")
    assert version(target) == "second" and leftovers(tmp_path) == []
    (target / "notes" / "deep" / "thesis.txt").unlink()
    write_version(target, "third")
    assert version(target) == "third"


def test_a_users_folder_named_like_a_staging_folder_is_not_a_leftover(tmp_path):
    backup = tmp_path / ".thesis.partial-backup"
    backup.mkdir()
    (backup / "chapter1.tex").write_text("precious")
    (tmp_path / ".empty.partial-x").mkdir()  # empty: a writer killed before its mark; nothing to lose
    unfinished = tmp_path / ".subj.partial-y"  # a writer killed while its first mark was being written
    unfinished.mkdir()
    (unfinished / f".{OWNER_MARK}.tmp-123").write_text('{"written_by": "med')
    half_marked = tmp_path / ".notes.partial-z"  # a mark is written whole, so this one is not the app's
    half_marked.mkdir()
    (half_marked / OWNER_MARK).write_text('{"written_by": "med')
    (half_marked / "notes.txt").write_text("precious")
    assert sorted(remove_leftovers(tmp_path)) == [".empty.partial-x", ".subj.partial-y"]
    assert (half_marked / "notes.txt").read_text() == "precious"
    write_version(tmp_path / "thesis", "first")
    assert (backup / "chapter1.tex").read_text() == "precious"


def test_another_hosts_staging_folder_is_neither_removed_nor_overwritten(tmp_path):
    """On shared storage (NFS, a ReadWriteMany volume) a writer on another host cannot be checked with a lock: its
    staging folder counts as a live writer's, so the same target is refused, naming the folder to remove."""
    other = tmp_path / ".subj.partial-pod1"
    other.mkdir()
    OwnerMark(Writer("another-host", 7, 0)).write(other)
    (other / "a").write_text("pod 1 is writing")
    assert remove_leftovers(tmp_path) == []
    with pytest.raises(OutputError, match=r"another run \(process 7 on host another-host.*remove .*partial-pod1"):
        write_version(tmp_path / "subj", "pod 2")
    assert (other / "a").read_text() == "pod 1 is writing" and not (tmp_path / "subj").exists()
    write_version(tmp_path / "other", "another name is free")


def test_a_second_writer_of_one_target_is_refused_while_the_first_writes(tmp_path):
    target = tmp_path / "subj"
    holder = start(HOLDER, target)
    try:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(OutputError, match="another run .* is writing it"):
            write_version(target, "second")
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        write_version(target, "second")
        assert version(target) == "second" and leftovers(tmp_path) == []
        assert (target / OWNER_MARK).is_file()
    finally:
        holder.kill()
