"""Files written safely: flocks that die with their process, write-then-rename, stage-then-publish."""

import os
import signal
import subprocess
import sys

import pytest

from trainer import files

# Stages a directory and a file temporary, says so, and waits to be killed.
WRITER = """
import fcntl, os, sys, time
from trainer import files
staged = files.StagedDirectory(os.path.join(sys.argv[1], "entry"))
temporary = open(files.temporary_name(os.path.join(sys.argv[1], "notes.txt")), "x")
fcntl.flock(temporary, fcntl.LOCK_EX)  # as write_atomically holds it while it writes
print(staged.path, temporary.name, flush=True)
time.sleep(600)
"""


def test_a_temporary_lives_as_long_as_its_writer(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        staged, temporary = writer.stdout.readline().split()
        assert files.writer_alive(staged) and files.writer_alive(temporary)
        with files.directory_lock(str(tmp_path)):
            files.remove_stale_temporaries(str(tmp_path))  # the writers are alive: kept
        assert os.path.isdir(staged) and os.path.exists(temporary)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert not files.writer_alive(staged) and not files.writer_alive(temporary)
    with files.directory_lock(str(tmp_path)):
        files.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [files.LOCK_FILE]


def test_a_held_lock_names_its_holder_and_is_released_with_the_block(tmp_path):
    with files.directory_lock(str(tmp_path), blocking=False):
        assert files.held(str(tmp_path / files.LOCK_FILE))
        with pytest.raises(files.Held, match=f"pid {os.getpid()} on .* since"):
            with files.directory_lock(str(tmp_path), blocking=False):
                pass
    assert not files.held(str(tmp_path / files.LOCK_FILE))
    assert not files.held(str(tmp_path / "missing"))


def test_staged_directories_are_published_whole_or_not_at_all(tmp_path):
    target = str(tmp_path / "export")
    for version in ("1", "2"):
        with files.staged_directory(target, keep=True) as staging:
            assert not os.path.exists(os.path.join(target, version))
            files.write_atomically(os.path.join(staging, version), version)
    assert os.listdir(target) == ["2"]  # replaced, no .writer left inside
    with pytest.raises(RuntimeError):
        with files.staged_directory(target, keep=True) as staging:
            raise RuntimeError("the save failed")
    with files.staged_directory(target, keep=False) as elsewhere:  # a worker that is not the chief
        files.write_atomically(os.path.join(elsewhere, "3"), "3")
    assert sorted(os.listdir(tmp_path)) == ["export"] and os.listdir(target) == ["2"]
    assert not os.path.exists(elsewhere)


def test_without_replace_the_first_published_version_stays(tmp_path):
    first, second = (files.StagedDirectory(str(tmp_path / "entry")) for _ in range(2))
    for staged in (first, second):
        files.write_atomically(os.path.join(staged.path, "writer"), staged.path)
    assert second.publish(replace=False) and not first.publish(replace=False)
    assert os.listdir(tmp_path) == ["entry"]
    assert (tmp_path / "entry" / "writer").read_text() == second.path
