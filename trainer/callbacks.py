"""What a run records: TensorBoard, history.csv, backups, best checkpoint, early stopping.

Only the chief writes; Keras' own callbacks send other workers' writes to
temporary directories under MultiWorkerMirroredStrategy. At each epoch's end the
history row comes before the backup, and the best checkpoint after it, so a kill
anywhere loses no row and never leaves a best checkpoint the history contradicts
(see BestEpoch).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from typing import Any

import tensorflow as tf
import tf_keras as keras
from absl import logging
from tensorboard.plugins.hparams import api as hparams_api

from trainer import workdir as workdir_lib

MONITOR = workdir_lib.MONITOR


class TrainingError(Exception):
    """The loss diverged: rerunning as is will not help."""


class Preempted(Exception):
    """SIGTERM arrived; training stopped with the backup at the last completed epoch."""


class EpochStats(keras.callbacks.Callback):
    """Adds learning rate, images/sec and epoch time to the logs; logs one line per epoch.

    Must come first in the callback list: later callbacks (TensorBoard,
    history.csv) record what it adds. Training time stops when validation starts.
    """

    def __init__(self, images_per_epoch: int, epochs: int):
        super().__init__()
        self.images_per_epoch = images_per_epoch
        self.epochs = epochs
        self._epoch_start = self._train_end = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start, self._train_end = time.perf_counter(), 0.0

    def on_test_begin(self, logs: dict | None = None) -> None:
        if self._epoch_start and not self._train_end:
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        train_seconds = (self._train_end or now) - self._epoch_start
        logs = logs if logs is not None else {}
        logs["learning_rate"] = float(keras.backend.get_value(self.model.optimizer.learning_rate))
        logs["images_per_sec"] = self.images_per_epoch / max(train_seconds, 1e-9)
        logs["epoch_seconds"] = now - self._epoch_start
        logging.info(
            "Epoch %d/%d: %s, %.0f images/s, %.1f s", epoch + 1, self.epochs,
            ", ".join(f"{k} {v:.4g}" for k, v in logs.items()
                      if k in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")),
            logs["images_per_sec"], logs["epoch_seconds"])
        self._epoch_start = 0.0
        if not math.isfinite(logs.get("loss", 0.0)):
            # Raised before the backup callback runs, so the backup keeps the last
            # finite weights; history.csv and the best checkpoint stay as they were.
            raise TrainingError(
                f"The loss became {logs['loss']} in epoch {epoch + 1}; training stopped. "
                "Lower --learning_rate and start again in a new --workdir; the best "
                "checkpoint and the logs so far are kept.")


class StopOnSigterm(keras.callbacks.Callback):
    """Turns SIGTERM (what Kubernetes sends a pod before killing it) into a clean stop.

    The signal handler only sets a flag. The next step boundary raises Preempted,
    before any end-of-epoch callback, so the backup stays at the last completed
    epoch and a rerun resumes there. Use as a context manager around `fit`: it
    owns the SIGTERM handler only for that long.
    """

    def __init__(self):
        super().__init__()
        self._supports_tf_logs = True  # the check needs no logs: never sync them
        self._signalled = False
        self._previous = None

    def __enter__(self) -> StopOnSigterm:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        self._signalled = True

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._signalled:
            raise Preempted("SIGTERM received: stopped during an epoch; the backup holds the "
                            "last completed epoch. Rerun the same command to resume.")


class HistoryCSV(keras.callbacks.Callback):
    """history.csv with one row per epoch, 1-based, rewritten atomically at each epoch end.

    An epoch repeated after a resume replaces its row (and drops rows after it),
    so the file never holds an epoch twice or a half-written line.
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        workdir_lib.write_history_row(self.path, epoch + 1, logs or {})


class BestEpoch(keras.callbacks.Callback):
    """Keeps the best epoch's weights in checkpoints/best and stops early; survives resumes.

    The best value and the epochs without gain come from history.csv, not from
    memory, so a resumed run never replaces the best weights by a worse epoch and
    its patience counts the epochs of earlier attempts. It runs after the backup:
    when a kill came between the backup of the best epoch and its checkpoint, the
    weights the backup restores are that epoch's, and they are saved at the start.
    A run that early stopping had already ended is not resumed (see
    `workdir.early_stopping_done`): nothing is trained.
    """

    def __init__(self, workdir: str, patience: int, chief: bool):
        super().__init__()
        self.workdir = workdir
        self.patience = patience  # 0: never stop early
        self.chief = chief
        self.best: dict[str, Any] | None = None  # the best epoch's history row
        self.started = False

    def _start(self, epochs_done: int) -> None:
        history = workdir_lib.read_history(os.path.join(self.workdir, workdir_lib.HISTORY_FILE))
        # Rows past the restored epoch are from an attempt killed before their backup:
        # those epochs run again.
        self.best = workdir_lib.best_epoch([row for row in history if row["epoch"] <= epochs_done])
        self.started = True
        if self.best is not None and self.best["epoch"] == epochs_done:
            # Decided from history.csv alone, the same on every worker.
            workdir_lib.write_best_checkpoint(self.model, self.workdir, epochs_done,
                                              self.best[MONITOR], self.chief)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if not self.started:
            self._start(epoch)  # fit begins after the epochs the backup restored

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {})[MONITOR]
        if self.best is None or value > self.best[MONITOR]:
            self.best = {"epoch": epoch + 1, MONITOR: value}
            workdir_lib.write_best_checkpoint(self.model, self.workdir, epoch + 1, value,
                                              self.chief)
        elif self.patience and epoch + 1 - self.best["epoch"] >= self.patience:
            logging.info("Early stopping after epoch %d: no %s gain in %d epochs since epoch %d.",
                         epoch + 1, MONITOR, self.patience, self.best["epoch"])
            self.model.stop_training = True

    def on_train_end(self, logs: dict | None = None) -> None:
        if not self.started:  # no epoch left: the backup is at the last epoch
            self._start(self.params["epochs"])


def create_callbacks(workdir: str, *, epochs: int, patience: int, images_per_epoch: int,
                     chief: bool) -> list[keras.callbacks.Callback]:
    """The run's callbacks, in the order they must run.

    Args:
      workdir: the run directory (TensorBoard logs go to its train/ and validation/).
      epochs: the maximum number of epochs.
      patience: epochs without val-accuracy gain before stopping; 0 never stops.
      images_per_epoch: training images per epoch, all replicas together.
      chief: whether this process writes history.csv and keeps the best checkpoint.
    """
    callbacks: list[keras.callbacks.Callback] = [EpochStats(images_per_epoch, epochs)]
    if chief:
        # Before the backup: a kill between the two repeats the epoch, whose row is
        # then replaced; after it, the epoch's row would be lost.
        callbacks.append(HistoryCSV(os.path.join(workdir, workdir_lib.HISTORY_FILE)))
    callbacks += [
        # Restores model, optimizer and epoch after a kill; kept after the end
        # so that a run killed while exporting does not start over.
        keras.callbacks.BackupAndRestore(os.path.join(workdir, workdir_lib.BACKUP_DIR),
                                         delete_checkpoint=False),
        BestEpoch(workdir, patience, chief),  # after the backup: see BestEpoch
        keras.callbacks.TensorBoard(workdir, update_freq="epoch", profile_batch=0),
    ]
    return callbacks


def write_run_summaries(workdir: str, hparams: dict[str, Any], images: tf.Tensor) -> None:
    """Writes the run's HParams and a few input images for TensorBoard (chief only)."""
    # HParams at the run's root so TensorBoard pairs them with train/ and validation/.
    root = tf.summary.create_file_writer(workdir)
    with root.as_default():
        hparams_api.hparams(
            {k: ("" if v is None else v) for k, v in hparams.items()},
            trial_id=os.path.basename(os.path.abspath(workdir)))
    root.close()
    train = tf.summary.create_file_writer(os.path.join(workdir, "train"))
    with train.as_default():
        tf.summary.image("input_images", images, step=0, max_outputs=int(images.shape[0]))
    train.close()
