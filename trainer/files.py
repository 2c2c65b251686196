"""Files written safely: flocks, write-then-rename, stage-then-publish, what killed writers leave.

A reader sees the old version of a file or directory or the new one, never half
of one: the new one is written under a temporary name beside its place
(`NAME.tmp-ID`) and renamed into place (`write_atomically`, `StagedDirectory`).

Whether a temporary's writer is alive is one rule everywhere: its writer holds
an flock on it (on a file itself, on a directory's `.writer` file) from its
creation until it is published or removed. The kernel drops an flock when its
process dies, however it dies, so a temporary whose flock is free was left by
a dead writer (`writer_alive`) and `remove_stale_temporaries` removes it.

Temporaries are removed only under the lock of their directory
(`directory_lock`), and created under it where a clean-up may run, so the
clean-up never sees one between its creation and its flock. Who holds the lock
is what differs:

- a run's workdir (and its checkpoints/): the run, for its whole life
  (workdir.locked): one live run per workdir, the only one that writes there;
- a file-cache directory, which several runs may share (--cache=DIR): each run
  for a moment, to create one temporary or to clean up, so runs write their own
  temporaries at the same time; the first to publish wins (`replace=False`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from typing import Iterator

from absl import logging

LOCK_FILE = ".lock"  # a directory's lock (see directory_lock)
WRITER_FILE = ".writer"  # in a staged directory: the file its writer holds an flock on
# NAME.tmp-ID: being written; NAME.old-ID: the version a publish is replacing.
TEMPORARY = re.compile(r"(.+)\.(tmp|old)-[\w-]+")


class Held(Exception):
    """Another live process holds the lock; the message is what its holder wrote in it."""


def holder() -> str:
    """This process, as a lock file names its holder."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


@contextlib.contextmanager
def flock(path: str, blocking: bool = True) -> Iterator[None]:
    """Holds an exclusive flock on file `path` (created if missing) while the block runs,
    with this process's pid, host and start time written in it.

    The kernel drops the lock when the process dies, however it dies: a killed
    holder never leaves a stale lock.

    Raises:
      Held: `blocking` is False and another process (or another open file) holds it.
    """
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            lock.seek(0)
            raise Held(lock.read().strip()) from None
        lock.truncate(0)
        lock.write(f"{holder()} since {time.ctime()}\n")
        lock.flush()
        yield


def directory_lock(directory: str, blocking: bool = True) -> contextlib.AbstractContextManager:
    """The flock of `directory`'s LOCK_FILE: its holder may create and remove temporaries there."""
    return flock(os.path.join(directory, LOCK_FILE), blocking)


def held(path: str) -> bool:
    """Whether a live process holds an (exclusive) flock on file `path`; False without the file."""
    try:
        fd = os.open(path, os.O_RDONLY)  # not created: a missing file has no holder
    except OSError:
        return False
    try:
        # A shared lock is refused only while another holds the exclusive one, and
        # needs read access only (on NFS too), so probes never block each other.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if this call took it
    return False


def writer_alive(temporary: str) -> bool:
    """Whether a live process still writes `temporary` (a file or a staged directory)."""
    if os.path.isdir(temporary):
        return held(os.path.join(temporary, WRITER_FILE))
    return held(temporary)


def temporary_name(path: str, kind: str = "tmp") -> str:
    """`path.tmp-ID` (or `.old-ID`), ID unique to this process and call."""
    return f"{path}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def write_atomically(path: str, text: str | bytes) -> None:
    """Writes a file (text or bytes) under a temporary name, then renames it: readers see
    old or new, never half."""
    temporary = temporary_name(path)
    with open(temporary, "xb" if isinstance(text, bytes) else "x") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # until closed: see writer_alive
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
        os.replace(temporary, path)


def publish_directory(staging: str, target: str, replace: bool = True) -> bool:
    """Renames directory `staging` to `target`; returns whether it is now `target`.

    Args:
      staging: the new version, complete.
      target: where it goes.
      replace: an existing `target` is replaced, kept as `target.old-ID` until the
        new version is in place (remove_stale_temporaries puts it back when the
        process died between the two renames); only where one process writes
        (a workdir). False: an existing `target` stays: the first published wins.
    """
    if not replace:
        try:
            os.rename(staging, target)
        except OSError:  # published by another writer first
            return False
        return True
    old = temporary_name(target, "old")
    if os.path.exists(target):
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return True


class StagedDirectory:
    """A new version of directory `target`, written at `path` (`target.tmp-ID`) with the
    flock of its `.writer` held, until `publish` renames it into place or `discard`.

    Create it holding the lock of target's directory (see the module's docstring).
    """

    def __init__(self, target: str):
        self.target, self.path = target, temporary_name(target)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        os.mkdir(self.path)
        self._writer = contextlib.ExitStack()
        self._writer.enter_context(flock(os.path.join(self.path, WRITER_FILE)))

    def publish(self, replace: bool = True) -> bool:
        """Renames the staged directory to `target` (see publish_directory), or removes it
        when another writer published first (`replace=False`); returns whether it is `target`."""
        published = publish_directory(self.path, self.target, replace)
        if published:
            # After the rename: while staged, the locked .writer marks a live writer.
            os.remove(os.path.join(self.target, WRITER_FILE))
        else:
            shutil.rmtree(self.path, ignore_errors=True)
        self._writer.close()
        return published

    def discard(self) -> None:
        """Removes the staged directory."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._writer.close()


@contextlib.contextmanager
def staged_directory(target: str, keep: bool) -> Iterator[str]:
    """Yields an empty directory to write `target`'s new version in; when the block ends,
    publishes it as `target` (keep) or removes it.

    Every worker of a multi-worker run writes (a save may run collectives); only
    the chief keeps its version, the others write in a temporary directory of the
    system. An exception removes the staged directory; a kill leaves it to
    remove_stale_temporaries. Call holding the lock of target's directory.
    """
    if not keep:
        path = tempfile.mkdtemp()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
        return
    staged = StagedDirectory(target)
    try:
        yield staged.path
    except BaseException:
        staged.discard()
        raise
    staged.publish()


def remove_stale_temporaries(directory: str) -> None:
    """Removes what killed writers left in `directory`.

    A temporary whose writer is dead (writer_alive) is removed. A `NAME.old-ID`
    whose `NAME` is missing was the published version when publish_directory was
    killed between its two renames: it is put back; otherwise it is removed.
    Call holding the directory's lock.
    """
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        match = TEMPORARY.fullmatch(name)
        if not match:
            continue
        path, published = os.path.join(directory, name), os.path.join(directory, match[1])
        if match[2] == "tmp" and writer_alive(path):
            continue
        if match[2] == "old" and not os.path.exists(published):
            logging.info("Restoring %s from %s, left by an interrupted run.", published, path)
            os.replace(path, published)
            continue
        logging.info("Removing %s, left by an interrupted run.", path)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
