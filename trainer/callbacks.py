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
import time
from typing import Any, Callable

import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer import hparams as hparams_lib
from trainer import sigterm
from trainer import workdir as workdir_lib
from trainer.sigterm import Preempted

MONITOR = workdir_lib.MONITOR
# A finite loss this many times the first epoch's and this many times the loss of chance
# (ln(classes)) has diverged: with oneDNN kernels a blown-up run can show 3e29, never NaN.
ABSURD_LOSS_VS_FIRST_EPOCH = 1000.0
ABSURD_LOSS_VS_CHANCE = 100.0


class TrainingError(Exception):
    """The loss diverged: rerunning as is will not help."""


def diverged(loss: float, first_epoch_loss: float | None, num_classes: int) -> bool:
    """Whether an epoch's training loss shows divergence.

    NaN or infinite, or finite but absurd: more than ABSURD_LOSS_VS_FIRST_EPOCH
    times the first epoch's loss and more than ABSURD_LOSS_VS_CHANCE times the
    loss of guessing (ln(num_classes)). Without a first epoch (this is it) the
    second bound alone decides.
    """
    if not math.isfinite(loss):
        return True
    chance = math.log(max(num_classes, 2))
    return (loss > ABSURD_LOSS_VS_CHANCE * chance
            and (first_epoch_loss is None or loss > ABSURD_LOSS_VS_FIRST_EPOCH * first_epoch_loss))


class EpochStats(keras.callbacks.Callback):
    """Adds learning rate, images/sec and epoch time to the logs; logs one line per epoch;
    stops a diverged run (see `diverged`).

    Must come first in the callback list: later callbacks (TensorBoard,
    history.csv) record what it adds. Training time stops when validation starts.
    """

    def __init__(self, images_per_epoch: int, epochs: int, num_classes: int = 2,
                 first_epoch_loss: float | None = None):
        """Args: images_per_epoch, epochs: for the log line; num_classes: sets the loss of
        chance; first_epoch_loss: the first epoch's loss when resuming (history.csv)."""
        super().__init__()
        self.images_per_epoch = images_per_epoch
        self.epochs = epochs
        self.num_classes = num_classes
        self.first_epoch_loss = first_epoch_loss
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
        # Keras' TensorBoard callback prefixes "epoch_": the scalar reads epoch_seconds.
        logs[workdir_lib.SECONDS] = now - self._epoch_start
        logging.info(
            "Epoch %d/%d: %s, %.0f images/s, %.1f s", epoch + 1, self.epochs,
            ", ".join(f"{k} {v:.4g}" for k, v in logs.items()
                      if k in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")),
            logs["images_per_sec"], logs[workdir_lib.SECONDS])
        self._epoch_start = 0.0
        loss = float(logs.get("loss", 0.0))
        if diverged(loss, self.first_epoch_loss, self.num_classes):
            # Raised before the backup callback runs, so the backup keeps the last
            # good epoch; history.csv and the best checkpoint stay as they were.
            raise TrainingError(
                f"The loss diverged to {loss:.4g} in epoch {epoch + 1}; training stopped. "
                "Lower --learning_rate and start again in a new --workdir; the best "
                "checkpoint, the backup of the last good epoch and the logs so far are kept.")
        if self.first_epoch_loss is None:
            self.first_epoch_loss = loss


class StopOnSigterm(keras.callbacks.Callback):
    """Turns SIGTERM (what Kubernetes sends a pod before killing it) into a clean stop.

    The next step boundary after the signal raises Preempted, before any
    end-of-epoch callback, so the backup stays at the last completed epoch and a
    rerun resumes there. Use as a context manager around `fit`: the process is
    in `sigterm`'s training phase for that long.
    """

    def __init__(self):
        super().__init__()
        self._supports_tf_logs = True  # the check needs no logs: never sync them
        self._phase = sigterm.phase(sigterm.Phase.TRAINING)

    def __enter__(self) -> StopOnSigterm:
        self._phase.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._phase.__exit__(*exc_info)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if sigterm.received():
            raise Preempted("SIGTERM received: stopped during an epoch; the backup holds the "
                            "last completed epoch. Rerun the same command to resume.")


class StepLearningRate(keras.callbacks.Callback):
    """Writes the learning rate of every training step to TensorBoard (`step_learning_rate`).

    For schedules that are a pure function of the step: the rates are computed
    in Python from the optimizer's step counter, read once per epoch, so no
    step waits on the device. They are written WRITE_EVERY steps at a time (and
    at each epoch's end) by one compiled loop, about 35 us per step on a CPU
    core, instead of one eager write per step (about 250 us). Point k is the
    rate optimizer step k (0-based) used.
    """

    WRITE_EVERY = 100  # steps

    def __init__(self, logdir: str, rate_at: Callable[[int], float]):
        super().__init__()
        self._supports_tf_logs = True  # needs no logs: never sync them
        self.logdir = logdir
        self.rate_at = rate_at
        self._writer: tf.summary.SummaryWriter | None = None
        self._write_scalars: Callable[[tf.Tensor, tf.Tensor], None] | None = None
        self._epoch_first_step = self._next_step = self._last_step = 0

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._writer = tf.summary.create_file_writer(self.logdir)
        # A function of its own: a trace holds the writer it was traced with.
        self._write_scalars = tf.function(_write_scalars, input_signature=[
            tf.TensorSpec([], tf.int64), tf.TensorSpec([None], tf.float32)])

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        # A resumed run starts at the restored step count, not at 0.
        self._epoch_first_step = int(keras.backend.get_value(self.model.optimizer.iterations))
        self._next_step = self._last_step = self._epoch_first_step

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # `batch` is the epoch's last step done (several with steps_per_execution).
        self._last_step = self._epoch_first_step + batch + 1
        if self._last_step - self._next_step >= self.WRITE_EVERY:
            self._write()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._write()
        self._writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        self._writer.close()

    def _write(self) -> None:
        steps = range(self._next_step, self._last_step)
        if steps:
            with self._writer.as_default():
                self._write_scalars(tf.constant(steps.start, tf.int64),
                                    tf.constant([self.rate_at(step) for step in steps], tf.float32))
        self._next_step = self._last_step


def _write_scalars(first_step: tf.Tensor, rates: tf.Tensor) -> None:
    for i in tf.range(tf.size(rates, out_type=tf.int64)):
        with tf.name_scope(""):  # the tag, not "while/..." from the loop's scope
            tf.summary.scalar("step_learning_rate", rates[i], step=first_step + i)


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
                     chief: bool, num_classes: int = 2, first_epoch_loss: float | None = None,
                     step_learning_rate: Callable[[int], float] | None = None,
                     ) -> list[keras.callbacks.Callback]:
    """The run's callbacks, in the order they must run.

    Args:
      workdir: the run directory (TensorBoard logs go to its train/ and validation/).
      epochs: the maximum number of epochs.
      patience: epochs without val-accuracy gain before stopping; 0 never stops.
      images_per_epoch: training images per epoch, all replicas together.
      chief: whether this process writes history.csv, the per-step rates and the best
        checkpoint.
      num_classes, first_epoch_loss: what a diverged loss is measured against
        (first_epoch_loss: from history.csv when resuming).
      step_learning_rate: the rate of a step, for a schedule that is a function
        of the step: logged per step to TensorBoard.
    """
    callbacks: list[keras.callbacks.Callback] = [
        EpochStats(images_per_epoch, epochs, num_classes, first_epoch_loss)]
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
    if chief and step_learning_rate is not None:
        callbacks.append(StepLearningRate(os.path.join(workdir, "train"), step_learning_rate))
    return callbacks


def write_run_summaries(workdir: str, hparams: dict[str, Any], images: tf.Tensor) -> None:
    """Writes the run's HParams (hparams.run_values) and a few input images for
    TensorBoard (chief only)."""
    hparams_lib.write_run(workdir, hparams)
    train = tf.summary.create_file_writer(os.path.join(workdir, "train"))
    with train.as_default():
        tf.summary.image("input_images", images, step=0, max_outputs=int(images.shape[0]))
    train.close()
