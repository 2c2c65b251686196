"""A run's directory: its lock, atomic writes, stale temporaries, config, history and summary files.

Everything a run keeps lives under its workdir. Files are written under a
temporary name (`NAME.tmp-PID`) and renamed, so a reader sees the old or the new
version, never half of one; what a killed run left is removed under the lock by
the next run. An flock keeps a second live run out and dies with its holder.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import re
import shutil
import socket
import time
from typing import Any, Iterator

from absl import logging

from trainer import config as config_lib
from trainer.config import Config, UserError

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
SUMMARY_FILE = "summary.json"
BACKUP_DIR = "backup"
BEST_CHECKPOINT = os.path.join("checkpoints", "best")
LOCK_FILE = ".lock"


@contextlib.contextmanager
def locked(workdir: str, chief: bool) -> Iterator[None]:
    """Creates the workdir and, on the chief, holds its lock for the whole run.

    The lock is an flock, which the kernel drops when its process dies: a killed
    run never leaves a stale lock, and a live one keeps a second run out.

    Raises:
      UserError: the workdir is not writable, or another live run holds it.
    """
    try:
        os.makedirs(workdir, exist_ok=True)
        lock = open(os.path.join(workdir, LOCK_FILE), "a+") if chief else None
    except OSError as e:
        raise UserError(f"--workdir={workdir} is not writable ({e.strerror}).") from None
    if lock is None:
        yield
        return
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise UserError(
                f"--workdir={workdir} is in use by another run ({lock.read().strip()}); let it "
                "finish or stop it, or use another --workdir.") from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n")
        lock.flush()
        yield
    finally:
        lock.close()  # releases the flock


def write_atomically(path: str, text: str) -> None:
    """Writes a file under a temporary name, then renames it: readers see old or new, never half."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def publish_directory(staging: str, target: str) -> None:
    """Replaces directory `target` by `staging` with renames: never seen half-written."""
    old = f"{target}.old-{os.getpid()}"
    if os.path.exists(target):
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(workdir: str) -> None:
    """Removes what a killed run's write-then-rename left (`NAME.tmp-PID`, `NAME.old-PID`)."""
    for name in os.listdir(workdir):
        if re.search(r"\.(tmp|old)-\d+$", name):
            path = os.path.join(workdir, name)
            logging.info("Removing %s, left by an interrupted run.", path)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def read_history(path: str) -> list[dict[str, Any]]:
    """Rows of a history.csv, numbers as floats (epoch as int); [] if absent."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: int(v) if k == "epoch" else float(v) for k, v in row.items() if v != ""}
            for row in rows]


def write_history_row(path: str, epoch: int, values: dict[str, Any]) -> None:
    """Records 1-based `epoch` in history.csv, atomically.

    An epoch repeated after a resume replaces its row (and drops rows after it),
    so the file never holds an epoch twice or a half-written line.
    """
    rows = [row for row in read_history(path) if row["epoch"] < epoch]
    rows.append({"epoch": epoch, **values})
    fields = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, out.getvalue())


def trained_an_epoch(workdir: str) -> bool:
    """Whether a run in `workdir` completed an epoch."""
    backup = os.path.join(workdir, BACKUP_DIR)
    return (os.path.exists(os.path.join(workdir, HISTORY_FILE))
            or (os.path.isdir(backup) and bool(os.listdir(backup))))


def prepare(config: Config, chief: bool) -> dict[str, Any] | None:
    """Checks the workdir holds this config (recording it if new); returns a finished run's summary.

    Call under `locked`. A workdir whose earlier attempt trained no epoch takes
    the new settings.

    Raises:
      UserError: the workdir holds a run of another config.
    """
    workdir = config.workdir
    if chief:  # under the lock: no other writer is alive
        remove_stale_temporaries(workdir)
    config_path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(config_path):
        with open(config_path) as f:
            previous = config_lib.from_json(f.read())
        changed = config_lib.differences(previous, config)
        if changed and not trained_an_epoch(workdir):
            logging.info("The earlier attempt in %s trained no epoch; starting afresh with "
                         "the new settings (%s).", workdir, ", ".join(changed))
            changed = []
            if chief:
                write_atomically(config_path, config_lib.to_json(config) + "\n")
        if changed:
            raise UserError(
                f"--workdir={workdir} holds a run with other settings ({', '.join(changed)} "
                "differ); rerun with the same flags to resume it, or use a new --workdir.")
    elif chief:
        write_atomically(config_path, config_lib.to_json(config) + "\n")
    return read_summary(workdir)


def read_summary(workdir: str) -> dict[str, Any] | None:
    """A finished run's summary.json, or None while the run is not finished."""
    path = os.path.join(workdir, SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
    """Writes summary.json, the last file of a run: its presence marks the run finished."""
    write_atomically(os.path.join(workdir, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")
