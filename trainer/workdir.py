"""A run's directory: its lock, config, history, best checkpoint and summary.

Everything a run keeps lives under its workdir, written by trainer/files.py's
write-then-rename and stage-then-publish, so a reader sees the old or the new
version, never half of one. The workdir's lock (an flock, which dies with its
holder) keeps a second live run out; under it, the next run removes what a
killed one left.

history.csv is the run's record: the best epoch and the epochs without gain
(early stopping) are read from it, so they survive any number of resumes, and
checkpoints/best holds the weights of its best epoch.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import statistics
from typing import Any, Iterator

from absl import logging

from trainer import checks
from trainer import config as config_lib
from trainer import files
from trainer.config import Config, UserError

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
SUMMARY_FILE = "summary.json"
BACKUP_DIR = "backup"
CHECKPOINTS_DIR = "checkpoints"
BEST_CHECKPOINT = os.path.join(CHECKPOINTS_DIR, "best")  # a directory, published by rename
BEST_WEIGHTS = "weights"  # checkpoint prefix inside BEST_CHECKPOINT
BEST_EPOCH_FILE = "epoch.json"  # inside BEST_CHECKPOINT: which epoch its weights are
MONITOR = "val_accuracy"  # the history column that decides the best epoch (higher is better)
SECONDS = "seconds"  # the history column of an epoch's time, training and validation
OLD_SECONDS = "epoch_seconds"  # its name in rows written before (TensorBoard: epoch_epoch_seconds)


@contextlib.contextmanager
def locked(workdir: str, chief: bool) -> Iterator[None]:
    """Creates the workdir and, on the chief, holds its lock for the whole run.

    The lock is an flock (files.directory_lock), which the kernel drops when its
    process dies: a killed run never leaves a stale lock, and a live one keeps a
    second run out. Its holder is the only writer of the workdir's temporaries.

    Raises:
      UserError: the workdir is not writable, or another live run holds it.
    """
    with contextlib.ExitStack() as lock:
        try:
            os.makedirs(workdir, exist_ok=True)
            if chief:
                lock.enter_context(files.directory_lock(workdir, blocking=False))
        except files.Held as held:
            raise UserError(f"--workdir={workdir} is in use by another run ({held}); let it "
                            "finish or stop it, or use another --workdir.") from None
        except OSError as e:
            raise UserError(f"--workdir={workdir} is not writable ({e.strerror}).") from None
        yield


def remove_stale_temporaries(workdir: str) -> None:
    """Removes what a killed run left in the workdir and its checkpoints/ (see
    files.remove_stale_temporaries). Call under `locked`."""
    for directory in (workdir, os.path.join(workdir, CHECKPOINTS_DIR)):
        files.remove_stale_temporaries(directory)


# Settings that may change between attempts at one run (its resumes): they change
# where, how fast or how long it runs, not what an epoch computes. Every other
# field is the run's identity (model, data, optimisation, global batch, seed).
ATTEMPT_SETTINGS = frozenset({
    "experiment",  # a preset only fills the other fields, which are compared
    "workdir",  # the run is the directory its files are in, however it is spelled
    "cache",  # the same decoded images, from memory, a file or no cache
    "epochs",  # raising it continues a run; below the epochs done is refused (workdir.prepare)
    "early_stopping_patience",  # when to stop, not what an epoch computes
    "precision",  # variables stay float32; a run preempted on a TPU can resume on GPUs
    "strategy", "tpu",  # the global batch is compared, not how it is spread over replicas
    "collective_timeout_sec", "steps_per_execution", "jit_compile",  # how fast
    # How a replica's share of the global batch is split into micro-batches, as the
    # strategy splits it over replicas: a run preempted on a large GPU can resume on a
    # smaller one. BatchNorm layers in training mode see micro-batch statistics, as they
    # see per-replica ones (docs/recipes.md); GroupNorm and frozen statistics are unchanged.
    "gradient_accumulation_steps", "micro_batch_size",
    "export", "export_backbone", "export_tflite",  # what is written at the end
})


def identity_settings(config: Config) -> set[str]:
    """The fields compared on resume: all but ATTEMPT_SETTINGS. Under bit_hyperrule
    --epochs is compared too: it splits the run's fixed steps into epochs, so another
    value would change the steps of the epochs still to run."""
    fields = set(config_lib.flatten(config)) - ATTEMPT_SETTINGS
    return fields | {"epochs"} if config.train.schedule == "bit_hyperrule" else fields


def differences(a: Config, b: Config) -> list[str]:
    """Returns the flags of the settings that change results (a run's identity) and differ.

    Paths are compared as `resolve` normalised them.
    """
    flat_a, flat_b = config_lib.flatten(a), config_lib.flatten(b)
    compared = identity_settings(a)
    return [config_lib.flag(name) for name in flat_a
            if name in compared and flat_a[name] != flat_b[name]]


def attempt_changes(a: Config, b: Config) -> list[str]:
    """Returns `--flag: old -> new` for each setting that may change between attempts and
    differs (those `identity_settings` leaves out)."""
    flat_a, flat_b = config_lib.flatten(a), config_lib.flatten(b)
    compared = identity_settings(a)
    return [f"{config_lib.flag(name)}: {flat_a[name]} -> {flat_b[name]}" for name in flat_a
            if name not in compared and flat_a[name] != flat_b[name]]


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
    files.write_atomically(path, out.getvalue())


def best_epoch(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The history row of the best epoch (the first of equal ones), or None without rows."""
    if not history:
        return None
    return max(history, key=lambda row: row.get(MONITOR, -math.inf))


def early_stopping_done(history: list[dict[str, Any]], patience: int) -> bool:
    """Whether early stopping ends the run after the last row: `patience` epochs (0: never)
    have passed without a gain on the best epoch."""
    best = best_epoch(history)
    return bool(patience) and best is not None and history[-1]["epoch"] - best["epoch"] >= patience


def summarize(history: list[dict[str, Any]], final_val_accuracy: float, **extra: Any) -> dict:
    """The run's summary.json from its history.csv rows and the final evaluation (of the
    best epoch's weights, which are exported)."""
    best = best_epoch(history)
    speeds = [row["images_per_sec"] for row in history]
    # The first epoch of a process includes tracing; leave it out when there are others.
    steady = speeds[1:] if len(speeds) > 1 else speeds
    return {
        "best_val_accuracy": best.get("val_accuracy"),
        "best_epoch": best["epoch"],
        "final_val_accuracy": final_val_accuracy,
        "last_epoch_val_accuracy": history[-1].get("val_accuracy"),
        "epochs_completed": len(history),
        "train_images_per_sec": statistics.median(steady),
        # Not wall time: start-up, caching, evaluation and exports are left out.
        "total_epoch_time_sec": sum(row.get(SECONDS, row.get(OLD_SECONDS, 0.0))
                                    for row in history),
        **extra,
    }


def write_best_checkpoint(model: Any, workdir: str, epoch: int, value: float, chief: bool) -> None:
    """Saves `model`'s weights as checkpoints/best, recording their 1-based `epoch` and `value`.

    Written in a temporary directory, then published by rename: a kill leaves the
    previous best whole. Every worker saves (a save may run collectives); only the
    chief's copy is kept.

    Args:
      model: a compiled tf_keras model.
      workdir: the run directory.
      epoch: the 1-based epoch the weights are the end of.
      value: that epoch's MONITOR value.
      chief: whether this process keeps the checkpoint.
    """
    with files.staged_directory(os.path.join(workdir, BEST_CHECKPOINT), keep=chief) as staging:
        model.save_weights(os.path.join(staging, BEST_WEIGHTS))
        files.write_atomically(os.path.join(staging, BEST_EPOCH_FILE),
                               json.dumps({"epoch": epoch, MONITOR: value}) + "\n")


def read_best_checkpoint_epoch(workdir: str) -> dict[str, Any] | None:
    """What checkpoints/best holds (`epoch`, MONITOR), or None before the first epoch."""
    path = os.path.join(workdir, BEST_CHECKPOINT, BEST_EPOCH_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_best_weights(model: Any, workdir: str) -> dict[str, Any]:
    """Loads checkpoints/best into `model`; returns what it holds (`epoch`, MONITOR).

    Raises:
      UserError: the workdir has no best checkpoint (it was deleted by hand).
    """
    best = read_best_checkpoint_epoch(workdir)
    if best is None:
        raise UserError(
            f"--workdir={workdir} has epochs in {HISTORY_FILE} but no {BEST_CHECKPOINT}/ (removed "
            "by hand?); its best weights are lost: use a new --workdir.")
    # Restores the optimizer's state too, which nothing uses after this.
    model.load_weights(os.path.join(workdir, BEST_CHECKPOINT, BEST_WEIGHTS)).expect_partial()
    return best


def trained_an_epoch(workdir: str) -> bool:
    """Whether a run in `workdir` completed an epoch."""
    backup = os.path.join(workdir, BACKUP_DIR)
    return (os.path.exists(os.path.join(workdir, HISTORY_FILE))
            or (os.path.isdir(backup) and bool(os.listdir(backup))))


def read_config(workdir: str) -> Config | None:
    """The config.json of the run's latest attempt, or None in a new workdir."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return checks.data_used(config_lib.from_json(f.read()))


def finished(history: list[dict[str, Any]], config: Config) -> bool:
    """Whether a run with these history.csv rows has nothing left to train under `config`:
    all its epochs, or early stopping ended it."""
    return len(history) >= config.train.epochs or early_stopping_done(
        history, config.train.early_stopping_patience)


def complete(config: Config) -> bool:
    """Whether the workdir holds this run (its identity unchanged), finished under `config`:
    a rerun then has nothing to do and needs none of its inputs. Read without the lock."""
    previous = read_config(config.workdir)
    if previous is None or read_summary(config.workdir) is None or differences(previous, config):
        return False
    return finished(read_history(os.path.join(config.workdir, HISTORY_FILE)), config)


def prepare(config: Config, chief: bool) -> dict[str, Any] | None:
    """Checks the workdir holds a run of this config and records the attempt; returns the
    summary of a run that is finished under this config, else None.

    Only the settings that change results are compared (`differences`);
    the others may change between attempts and are logged. A workdir whose earlier
    attempt trained no epoch takes any new settings. A finished run continues when
    this config allows more epochs (a higher --epochs or --early_stopping_patience).
    Call under `locked`.

    Raises:
      UserError: the workdir holds a run of other settings, or more epochs than --epochs.
    """
    workdir = config.workdir
    if chief:  # under the lock: no other writer is alive
        remove_stale_temporaries(workdir)
    previous = read_config(workdir)
    history = read_history(os.path.join(workdir, HISTORY_FILE))
    if previous is not None:
        changed = differences(previous, config)
        if changed and not trained_an_epoch(workdir):
            logging.info("The earlier attempt in %s trained no epoch; starting afresh with "
                         "the new settings (%s).", workdir, ", ".join(changed))
        elif changed:
            raise UserError(
                f"--workdir={workdir} holds a run with other settings ({', '.join(changed)} "
                "differ); rerun with the same flags to resume it, or use a new --workdir.")
        if len(history) > config.train.epochs:
            raise UserError(
                f"--epochs={config.train.epochs} is below the {len(history)} epochs the run in "
                f"--workdir={workdir} has completed; rerun with --epochs={len(history)} or more.")
    summary = read_summary(workdir)
    if summary is not None:
        if finished(history, config):
            return summary
        logging.info("The run in %s finished after %d epochs; continuing it up to --epochs=%d "
                     "(--early_stopping_patience=%d).", workdir, len(history),
                     config.train.epochs, config.train.early_stopping_patience)
        if chief:
            os.remove(os.path.join(workdir, SUMMARY_FILE))
    if previous is not None:
        for change in attempt_changes(previous, config):
            logging.info("%s since the last attempt (a setting that may change between "
                         "attempts: it does not change what an epoch computes).", change)
    if chief and previous != config:
        files.write_atomically(os.path.join(workdir, CONFIG_FILE),
                               config_lib.to_json(config) + "\n")
    return None


def read_summary(workdir: str) -> dict[str, Any] | None:
    """A finished run's summary.json, or None while the run is not finished."""
    path = os.path.join(workdir, SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
    """Writes summary.json, the last file of a run: its presence marks the run finished."""
    files.write_atomically(os.path.join(workdir, SUMMARY_FILE),
                           json.dumps(summary, indent=2) + "\n")
