"""train_and_evaluate(config): strategy -> data -> model in scope -> fit -> evaluate -> export.

Everything of a run goes under its workdir; rerunning with the same config and
workdir resumes an interrupted run and leaves a finished one alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
import time
from typing import Any

import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer import callbacks as callbacks_lib
from trainer import checks
from trainer import compute as compute_lib
from trainer import config as config_lib
from trainer import (backbones, distribute, export, hparams, models, preflight, schedules, sigterm,
                     tflite)
from trainer import steps as steps_lib
from trainer import workdir as workdir_lib
from trainer.config import Config
from trainer.data import cache, pipeline, sources

PREVIEW_IMAGES = 8  # input images shown in TensorBoard


def _flag_values(values: dict[str, Any]) -> str:
    return ", ".join(f"{config_lib.flag(k)}={v:g}" if isinstance(v, float)
                     else f"{config_lib.flag(k)}={v}" for k, v in values.items())


def choose_from_data(config: Config, source: sources.DataSource) -> Config:
    """Fills the values `config` leaves to the data (None there), as BiT-HyperRule does.

    The image size by the images' area, the resize size by BiT's ratio for that
    area, MixUp by the training-set size, and under bit_hyperrule the run's
    steps by the training-set size and the peak rate by the batch size
    (trainer/schedules.py). Values given by flags or presets are kept. The log
    names what was chosen, and from what, with the sizes the run will use.

    Raises:
      UserError: the chosen values do not fit the given ones; names the flag.
    """
    d, t = config.data, config.train
    num_train = source.sizes["train"]
    from_data: dict[str, Any] = {}
    measured = ""
    if d.mixup_alpha is None:
        from_data["mixup_alpha"] = schedules.mixup_alpha(num_train)
    if t.schedule == "bit_hyperrule" and t.total_steps is None:
        from_data["total_steps"] = schedules.rule_supports(num_train)[-1]
        checks.check_epochs_divide(t.epochs, from_data["total_steps"],
                                   f"BiT-HyperRule's length for {num_train} training images")
    if d.image_size is None or (d.augment == "resize_crop" and d.resize_size is None):
        height, width = source.typical_image_size()
        resize_size, crop_size = schedules.resolution(height, width)
        if d.image_size is None:
            from_data["image_size"] = crop_size
        if d.augment == "resize_crop" and d.resize_size is None:
            # A given --image_size keeps BiT's resize/crop ratio for this area.
            from_data["resize_size"] = (resize_size if d.image_size is None else
                                        schedules.resize_size_for(d.image_size, height, width))
        measured = f"; typical image {height}x{width}, the median area of a sample"
    values = dict(from_data)
    if t.schedule == "bit_hyperrule" and t.learning_rate is None:
        values["learning_rate"] = schedules.peak_learning_rate(d.global_batch_size)
    if not values:
        return config
    chosen = config_lib.override(config, values)
    checks.check(chosen)
    if from_data:
        logging.info("Chosen from the data (%d training images%s): %s.", num_train, measured,
                     _flag_values(from_data))
    if "learning_rate" in values:
        logging.info("Chosen from the batch size: %s (BiT-HyperRule: %g x %d / %d).",
                     _flag_values({"learning_rate": values["learning_rate"]}),
                     schedules.BASE_LEARNING_RATE, d.global_batch_size,
                     schedules.BASE_BATCH_SIZE)
    return chosen


def create_schedule(config: Config, num_train_examples: int,
                    ) -> tuple[int, schedules.HyperRuleSchedule | None]:
    """Steps per epoch, and the learning-rate schedule (None: the constant rate).

    The constant schedule's epochs are passes over the data. Under
    bit_hyperrule the run's total_steps are split into `epochs` equal parts:
    each ends with a validation, a backup and a history row, and a resumed run
    restarts at a part's boundary with the optimizer's step count restored.
    """
    train = config.train
    if train.schedule != "bit_hyperrule":
        return pipeline.steps_per_epoch(num_train_examples, config.data.global_batch_size), None
    schedule = schedules.HyperRuleSchedule(
        schedules.supports(num_train_examples, train.total_steps), train.learning_rate)
    steps_per_epoch = train.total_steps // train.epochs
    logging.info("BiT-HyperRule: %d steps (supports %s), peak rate %g, in %d epochs of %d "
                 "steps; MixUp alpha %g.", train.total_steps, list(schedule.step_supports),
                 train.learning_rate, train.epochs, steps_per_epoch, config.data.mixup_alpha)
    return steps_per_epoch, schedule


def weights_fingerprint(model: keras.Model) -> str:
    """A short hash of all the model's weights, to compare workers' copies."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(weight.tobytes())
    return digest.hexdigest()[:16]


def distributed_dataset(source: sources.DataSource, split: str, strategy: tf.distribute.Strategy,
                        global_batch_size: int) -> tf.distribute.DistributedDataset:
    """Returns the input of `split` as fit reads it: one pipeline per worker, each told its
    shard by the strategy, batched per replica."""
    batch_size = distribute.per_replica_batch_size(global_batch_size, strategy)
    return strategy.distribute_datasets_from_function(
        lambda ctx: pipeline.create_dataset(source, split, batch_size, ctx))


def prepare_data(config: Config, cache_dir: str | None = None, input_pipelines: int = 1,
                 ) -> tuple[Config, sources.DataSource, int, schedules.HyperRuleSchedule | None]:
    """Creates the run's data source and makes the choices that depend on the data.

    Args:
      config: the run's configuration.
      cache_dir: the run's directory for file caches (see pipeline.choose_cache).
      input_pipelines: workers reading the data.

    Returns:
      (config with the data's choices filled in, data source with its cache
      decided, steps per epoch, learning-rate schedule or None for the constant rate).
    """
    source = sources.create_data_source(config.data, config.seed)
    config = choose_from_data(config, source)
    source = pipeline.choose_cache(dataclasses.replace(source, config=config.data), cache_dir,
                                   input_pipelines)
    steps_per_epoch, schedule = create_schedule(config, source.sizes["train"])
    return config, source, steps_per_epoch, schedule


def create_compiled_model(
    config: Config, strategy: tf.distribute.Strategy, num_classes: int,
    compute: compute_lib.Compute,
    learning_rate: keras.optimizers.schedules.LearningRateSchedule | None = None,
) -> keras.Model:
    """Sets the precision policy of `compute`, then builds the model (trainer/steps.py),
    optimizer and metrics inside the strategy's scope and compiles them with its XLA and
    steps per execution.

    With MixUp the labels are one-hot or soft, and the loss takes them as such;
    without, the integer labels go to the sparse loss as they come.
    """
    loss = steps_lib.create_loss(bool(config.data.mixup_alpha), config.train.label_smoothing)
    distribute.set_precision(compute.precision)
    with strategy.scope():
        network = models.create_model(config.model, num_classes, config.data.image_size)
        model = steps_lib.TrainingModel(
            network.inputs, network.outputs, name=network.name,
            accumulation_steps=compute.accumulation_steps, ema_decay=config.train.ema_decay)
        model.compile(optimizer=steps_lib.create_optimizer(config.train, learning_rate),
                      loss=loss, metrics=["accuracy"],
                      steps_per_execution=compute.steps_per_execution,
                      jit_compile=compute.jit_compile)
    return model


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run trains with: made by `setup`, the same way for a run and for the benchmark."""

    config: Config  # with the choices made from the data filled in
    source: sources.DataSource  # its cache decided
    steps_per_epoch: int
    schedule: schedules.HyperRuleSchedule | None  # None: the constant rate
    compute: compute_lib.Compute
    train_data: tf.distribute.DistributedDataset | tf.data.Dataset
    val_data: tf.distribute.DistributedDataset | tf.data.Dataset
    model: keras.Model  # compiled, in the strategy's scope


def setup(config: Config, strategy: tf.distribute.Strategy,
          cache_dir: str | None = None) -> Setup:
    """Checks the backbone's weights, then makes the data, the compute choices, the
    distributed input and the compiled model of a run, logging each choice.

    Args:
      config: the run's configuration (resolved).
      strategy: the run's strategy (created first: under TF_CONFIG it names the chief).
      cache_dir: the run's directory for file caches; None: no file cache unless
        --cache names a directory.

    Raises:
      UserError: bad data, weights, hub handle or settings; names the flag.
    """
    backbones.spec(config.model.backbone).check_source(config.model)  # before a long data download
    config, source, steps_per_epoch, schedule = prepare_data(
        config, cache_dir=cache_dir, input_pipelines=distribute.num_workers(strategy))
    logging.info("Data: %d classes, %d training and %d validation examples, %d steps per epoch.",
                 source.num_classes, source.sizes["train"], source.sizes["val"], steps_per_epoch)
    compute = compute_lib.choose_compute(config, strategy, steps_per_epoch)
    global_batch_size = config.data.global_batch_size
    logging.info("Strategy %s with %d replicas (batch %d each, in %d micro-batches: %s). "
                 "Precision %s: %s. jit_compile %s: %s. %d steps per execution: %s.",
                 type(strategy).__name__.lstrip("_"), strategy.num_replicas_in_sync,
                 distribute.per_replica_batch_size(global_batch_size, strategy),
                 compute.accumulation_steps, compute.accumulation_reason,
                 distribute.precision_words(compute.computes_in), compute.precision_reason,
                 compute.jit_compile, compute.jit_compile_reason,
                 compute.steps_per_execution, compute.steps_per_execution_reason)
    train_data, val_data = (distributed_dataset(source, split, strategy, global_batch_size)
                            for split in ("train", "val"))
    model = create_compiled_model(config, strategy, source.num_classes, compute, schedule)
    return Setup(config, source, steps_per_epoch, schedule, compute, train_data, val_data, model)


def train_and_evaluate(config: Config) -> dict[str, Any]:
    """Trains, evaluates and exports the run `config` describes (see module docstring).

    Returns:
      The run's summary (also written to workdir/summary.json by the chief).

    Raises:
      UserError: bad data, weights, hub handle or settings; names the flag.
      callbacks.TrainingError: the loss diverged.
      sigterm.Preempted: SIGTERM arrived; a rerun resumes or completes the run.
      PeerLost: a multi-worker peer stopped answering.
    """
    # Every input named and reachable, before the workdir is made or anything fetched;
    # a finished run needs none of them to say so.
    if not workdir_lib.complete(config):
        preflight.check(config)
    # Then the strategy: under TF_CONFIG it decides who the chief is.
    strategy = distribute.create_strategy(config.train)
    chief = distribute.is_chief(strategy)
    # The run sets the global policy for its model; its caller gets its own back.
    caller_policy = keras.mixed_precision.global_policy()
    try:
        with workdir_lib.locked(config.workdir, chief):
            return _train_and_evaluate(config, strategy, chief)
    finally:
        keras.mixed_precision.set_global_policy(caller_policy)


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
    per_replica_batch = distribute.per_replica_batch_size(global_batch_size, strategy)
    strategy_name = type(strategy).__name__.lstrip("_")
    keras.utils.set_random_seed(config.seed)

    run = setup(config, strategy, cache_dir=os.path.join(workdir, cache.WORKDIR_CACHE))
    config, source, steps_per_epoch, schedule, compute, model = (
        run.config, run.source, run.steps_per_epoch, run.schedule, run.compute, run.model)
    num_train = source.sizes["train"]
    train_ds, val_ds = run.train_data, run.val_data
    if chief:
        # What the run computes in and compiles with, not what was asked for ("auto").
        values = hparams.run_values(config_lib.flatten(config), {
            "precision": compute.precision, "jit_compile": compute.jit_compile})
        callbacks_lib.write_run_summaries(workdir, values,
                                          pipeline.preview(source, PREVIEW_IMAGES))

    started = time.time()
    earlier_epochs = workdir_lib.read_history(os.path.join(workdir, workdir_lib.HISTORY_FILE))
    callbacks = callbacks_lib.create_callbacks(
        workdir, epochs=config.train.epochs, patience=config.train.early_stopping_patience,
        images_per_epoch=steps_per_epoch * global_batch_size, chief=chief,
        num_classes=source.num_classes,
        first_epoch_loss=earlier_epochs[0].get("loss") if earlier_epochs else None,
        step_learning_rate=schedule.rate if schedule else None)
    validation_steps = None
    if not isinstance(val_ds, tf.data.Dataset):
        # Keras needs a step count for distributed input (any strategy but the default).
        # Every worker reads the whole validation split (see pipeline.create_dataset): count
        # its batches.
        local_replicas = replicas // distribute.num_workers(strategy)
        validation_steps = math.ceil(
            math.ceil(source.sizes["val"] / per_replica_batch) / local_replicas)
    history = workdir_lib.read_history(os.path.join(workdir, workdir_lib.HISTORY_FILE))
    if workdir_lib.early_stopping_done(history, config.train.early_stopping_patience):
        # Killed after early stopping ended it (while exporting): resuming would train on.
        logging.info("Early stopping ended this run after epoch %d; finishing it.",
                     history[-1]["epoch"])
    else:
        with callbacks_lib.StopOnSigterm() as stop_on_sigterm, distribute.lost_peer_is_an_error(strategy):
            model.fit(train_ds, epochs=config.train.epochs, steps_per_epoch=steps_per_epoch,
                      validation_data=val_ds, validation_steps=validation_steps,
                      # A progress bar on a terminal; in a log, the trainer's own epoch line.
                      verbose=1 if sys.stdout.isatty() else 0,
                      callbacks=[stop_on_sigterm, steps_lib.AveragesForValidation(), *callbacks])

    sigterm.stop_if_received("training")  # the signal came after the last step
    # SIGTERM from here on: what is being written is finished, then the run stops
    # (Preempted) before the next write; a rerun does the rest.
    with sigterm.phase(sigterm.Phase.FINISHING):
        optimizer_steps = int(keras.backend.get_value(model.optimizer.iterations))
        # The run's result is its best epoch (of all attempts), whichever epoch it ended on.
        best = workdir_lib.load_best_weights(model, workdir)
        logging.info("Evaluating and exporting the weights of epoch %d, the best (%s %.4f).",
                     best["epoch"], workdir_lib.MONITOR, best[workdir_lib.MONITOR])
        model.use_averages()  # with --ema_decay: what validation saw
        with distribute.lost_peer_is_an_error(strategy):
            _, final_val_accuracy = model.evaluate(val_ds, steps=validation_steps, verbose=0)
        # Equal on every worker when replicas stayed in sync: compare across worker logs.
        logging.info("Final weights fingerprint: %s", weights_fingerprint(model))
        if config.train.export:
            sigterm.stop_if_received("training and the final evaluation")
            export.export_model(steps_lib.plain_model(model), source.class_names, workdir, chief)
        if config.train.export_backbone:
            sigterm.stop_if_received("writing export/")
            export.export_backbone(model, config.data.image_size, workdir, chief)
        sigterm.stop_if_received("writing the exports")
        if not chief:
            return {}
        tflite_val_accuracy = tflite.export_and_evaluate(
            config, model, source, os.path.join(workdir, export.EXPORT_DIR))
        history = workdir_lib.read_history(os.path.join(workdir, workdir_lib.HISTORY_FILE))
        summary = workdir_lib.summarize(
            history, float(final_val_accuracy), num_replicas=replicas, **compute.computes_in,
            strategy=strategy_name, jit_compile=compute.jit_compile,
            global_batch_size=global_batch_size, num_classes=source.num_classes,
            train_examples=num_train, val_examples=source.sizes["val"],
            steps_per_epoch=steps_per_epoch, optimizer_steps=optimizer_steps,
            gradient_accumulation_steps=compute.accumulation_steps,
            tflite_val_accuracy=tflite_val_accuracy,
            image_size=config.data.image_size, resize_size=config.data.resize_size,
            mixup_alpha=config.data.mixup_alpha, learning_rate=config.train.learning_rate,
            last_process_sec=time.time() - started)
        workdir_lib.write_summary(workdir, summary)
    logging.info("Best val accuracy %.4f (epoch %d); final %.4f. Written to %s.",
                 summary["best_val_accuracy"], summary["best_epoch"], final_val_accuracy, workdir)
    return summary
