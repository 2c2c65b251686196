"""train_and_evaluate(config): strategy -> data -> model in scope -> fit -> evaluate -> export.

Everything of a run goes under its workdir; rerunning with the same config and
workdir resumes an interrupted run and leaves a finished one alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import statistics
import sys
import time
from typing import Any, Iterator

import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer import callbacks as callbacks_lib
from trainer import config as config_lib
from trainer import data, distribute, export, models, workdir as workdir_lib
from trainer.config import Config, UserError

PREVIEW_IMAGES = 8  # input images shown in TensorBoard


class PeerLost(Exception):
    """A multi-worker peer stopped answering; restarting all workers resumes the run."""


@contextlib.contextmanager
def lost_peer_is_an_error(strategy: tf.distribute.Strategy) -> Iterator[None]:
    """Under MultiWorkerMirroredStrategy, turns a collective that timed out or lost its
    peer into PeerLost, which says what to do (TensorFlow has logged the details)."""
    try:
        yield
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError,
            tf.errors.CancelledError, tf.errors.AbortedError) as e:
        if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            raise
        raise PeerLost(
            f"A peer worker stopped answering ({type(e).__name__}; see TensorFlow's messages "
            "above). Restart all workers with the same command: they resume from the last "
            "completed epoch.") from None


def create_optimizer(config: config_lib.TrainConfig) -> keras.optimizers.Optimizer:
    """Adam, or SGD with momentum 0.9, at the configured learning rate."""
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(config.learning_rate, momentum=0.9)
    return keras.optimizers.Adam(config.learning_rate)


def weights_fingerprint(model: keras.Model) -> str:
    """A short hash of all the model's weights, to compare workers' copies."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(weight.tobytes())
    return digest.hexdigest()[:16]


def create_compiled_model(config: Config, strategy: tf.distribute.Strategy, num_classes: int,
                          jit_compile: bool) -> keras.Model:
    """Builds the model, optimizer and metrics inside the strategy's scope and compiles them
    (under the global precision policy already set)."""
    with strategy.scope():
        model = models.create_model(config.model, num_classes, config.data.image_size)
        model.compile(optimizer=create_optimizer(config.train),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                      steps_per_execution=config.train.steps_per_execution,
                      jit_compile=jit_compile)
    return model


def summarize(history: list[dict[str, Any]], final_val_accuracy: float, **extra: Any) -> dict:
    """The run's summary.json from its history.csv rows and the final evaluation."""
    best = max(history, key=lambda row: row.get("val_accuracy", -1.0))
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
        "wall_time_sec": sum(row["epoch_seconds"] for row in history),
        **extra,
    }


def train_and_evaluate(config: Config) -> dict[str, Any]:
    """Trains, evaluates and exports the run `config` describes (see module docstring).

    Returns:
      The run's summary (also written to workdir/summary.json by the chief).

    Raises:
      UserError: bad data, weights, hub handle or settings; names the flag.
      callbacks.TrainingError: the loss diverged.
      callbacks.Preempted: SIGTERM arrived; the backup is at the last completed epoch.
      PeerLost: a multi-worker peer stopped answering.
    """
    # The strategy comes first: under TF_CONFIG it decides who the chief is.
    strategy = distribute.create_strategy(config.train)
    chief = distribute.is_chief(strategy)
    with workdir_lib.locked(config.workdir, chief):
        return _train_and_evaluate(config, strategy, chief)


def _train_and_evaluate(config: Config, strategy: tf.distribute.Strategy,
                        chief: bool) -> dict[str, Any]:
    workdir = config.workdir
    done = workdir_lib.prepare(config, chief)
    if done is not None:
        logging.info("The run in %s is already complete (best val accuracy %.4f); "
                     "nothing to do.", workdir, done["best_val_accuracy"])
        return done

    replicas = strategy.num_replicas_in_sync
    global_batch_size = config.data.global_batch_size
    if global_batch_size % replicas:
        raise UserError(f"--batch_size={global_batch_size} must divide evenly over the "
                        f"{replicas} replicas; use a multiple of {replicas}.")
    per_replica_batch_size = global_batch_size // replicas
    strategy_name = type(strategy).__name__.lstrip("_")
    precision, why = distribute.choose_precision(config.train, strategy)
    jit_compile, jit_why = distribute.choose_jit_compile(config.train, strategy)
    logging.info("Strategy %s with %d replicas (batch %d each); precision %s (%s); "
                 "jit_compile %s (%s).", strategy_name, replicas,
                 per_replica_batch_size, precision, why, jit_compile, jit_why)
    distribute.set_precision(precision)
    keras.utils.set_random_seed(config.seed)

    models.check_backbone_source(config.model)  # before a long data download
    source = data.create_data_source(config.data, config.seed,
                                     cache_dir=os.path.join(workdir, data.WORKDIR_CACHE),
                                     input_pipelines=distribute.num_workers(strategy))
    steps_per_epoch = data.steps_per_epoch(source.sizes["train"], global_batch_size)
    logging.info("Data: %d classes, %d training and %d validation examples, %d steps per epoch.",
                 source.num_classes, source.sizes["train"], source.sizes["val"], steps_per_epoch)
    train_ds, val_ds = (
        strategy.distribute_datasets_from_function(
            lambda ctx, split=split: source.dataset(split, per_replica_batch_size, ctx))
        for split in ("train", "val"))

    model = create_compiled_model(config, strategy, source.num_classes, jit_compile)
    if chief:
        callbacks_lib.write_run_summaries(
            workdir, config_lib.flatten(config), source.preview(PREVIEW_IMAGES))

    started = time.time()
    callbacks = callbacks_lib.create_callbacks(
        workdir, epochs=config.train.epochs, patience=config.train.early_stopping_patience,
        images_per_epoch=steps_per_epoch * global_batch_size, chief=chief)
    validation_steps = None
    if distribute.num_workers(strategy) > 1:
        # Keras needs a step count for multi-worker input. Every worker reads the
        # whole validation split (see DataSource.dataset): count its batches.
        local_replicas = replicas // distribute.num_workers(strategy)
        validation_steps = math.ceil(
            math.ceil(source.sizes["val"] / per_replica_batch_size) / local_replicas)
    with callbacks_lib.StopOnSigterm() as sigterm, lost_peer_is_an_error(strategy):
        model.fit(train_ds, epochs=config.train.epochs, steps_per_epoch=steps_per_epoch,
                  validation_data=val_ds, validation_steps=validation_steps,
                  verbose=1 if sys.stdout.isatty() else 2, callbacks=[sigterm, *callbacks])

    with lost_peer_is_an_error(strategy):
        _, final_val_accuracy = model.evaluate(val_ds, steps=validation_steps, verbose=0)
    # Equal on every worker when replicas stayed in sync: compare across worker logs.
    logging.info("Final weights fingerprint: %s", weights_fingerprint(model))
    if config.train.export:
        export.export_model(model, source.class_names, workdir, chief)
    if config.train.export_backbone:
        export.export_backbone(model, config.data.image_size, workdir, chief)
    if not chief:
        return {}
    history = workdir_lib.read_history(os.path.join(workdir, workdir_lib.HISTORY_FILE))
    summary = summarize(
        history, float(final_val_accuracy), num_replicas=replicas, precision=precision,
        strategy=strategy_name, jit_compile=jit_compile,
        global_batch_size=global_batch_size, num_classes=source.num_classes,
        train_examples=source.sizes["train"], val_examples=source.sizes["val"],
        last_process_sec=time.time() - started)
    workdir_lib.write_summary(workdir, summary)
    logging.info("Best val accuracy %.4f (epoch %d); final %.4f. Written to %s.",
                 summary["best_val_accuracy"], summary["best_epoch"], final_val_accuracy, workdir)
    return summary
