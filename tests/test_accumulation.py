"""Whole runs with micro-batches and averaged weights: BiT's export is the big batch's function, the
preset's micro-batches follow the replicas, a killed run restarts cleanly, the averages survive a
resume and are what validation, the best checkpoint and the export use."""

import json
import re

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import faults
from trainer import callbacks as callbacks_lib
from trainer import checks
from trainer import config as config_lib
from trainer import experiments, models, steps, train

# Random-weight BiT on synthetic 32 px images: 64 training images, 4 steps of 16.
BIT = {"dataset": "synthetic", "synthetic_examples": 80, "val_fraction": 0.2, "image_size": 32,
       "backbone": "bit", "bit_variant": "m-r50x1", "bit_weights": "none", "optimizer": "sgd",
       "batch_size": 16, "epochs": 1, "early_stopping_patience": 0, "precision": "float32",
       "jit_compile": "false"}
# A tiny Wide ResNet that learns in a few epochs (as tests/test_resume.py's).
TINY = {"experiment": "smoke", "synthetic_examples": 200, "image_size": 16, "wrn_width": 1,
        "batch_size": 8, "learning_rate": 5e-3, "precision": "float32", "jit_compile": "false"}
IMAGES = np.random.default_rng(3).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)


def config_of(base, workdir, **values):
    preset = experiments.preset(base.get("experiment"))
    return checks.resolve(config_lib.override(preset, {**base, "workdir": str(workdir), **values}))


def exported(workdir, images=IMAGES):
    serve = tf.saved_model.load(str(workdir / "export")).signatures["serving_default"]
    (probabilities,) = serve(image=tf.constant(images)).values()
    return probabilities.numpy()


def test_the_preset_runs_the_authors_batch_in_micro_batches_that_follow_the_replicas():
    preset = checks.resolve(experiments.configure("bit_hyperrule", {}))
    assert (preset.data.global_batch_size, preset.train.micro_batch_size) == (512, 16)
    for replicas, micro_batches in ((1, 32), (2, 16), (8, 4), (32, 1), (64, 1)):
        assert steps.choose_accumulation(preset.train, 512 // replicas)[0] == micro_batches
    # Either flag replaces what the preset gave the other.
    given = checks.resolve(experiments.configure("bit_hyperrule", {
        "gradient_accumulation_steps": 8}))
    assert (given.train.gradient_accumulation_steps, given.train.micro_batch_size) == (8, None)


def run_bit(tmp_path, name, **values):
    summary = train.train_and_evaluate(config_of(BIT, tmp_path / name, **values))
    return exported(tmp_path / name), summary


@pytest.mark.slow
def test_bit_r50x1_exports_the_big_batchs_function_and_not_the_small_batchs(tmp_path):
    """The issue's check: native BiT-M R50x1, random weights, float32, SGD, one epoch."""
    big, _ = run_bit(tmp_path, "big")
    accumulated, summary = run_bit(tmp_path, "accumulated", gradient_accumulation_steps=4)
    small, _ = run_bit(tmp_path, "small", batch_size=4)
    assert summary["optimizer_steps"] == 4
    assert np.abs(accumulated - big).max() < 1e-4
    assert np.abs(small - big).max() > 1e-2


def fingerprint(log):
    (found,) = re.findall(r"Final weights fingerprint: (\w+)", log)
    return found


@pytest.mark.slow
def test_a_run_killed_between_micro_batch_steps_restarts_and_ends_bit_for_bit(tmp_path):
    flags = [f"{config_lib.flag(k)}={v}" for k, v in TINY.items()] + [
        "--epochs=2", "--gradient_accumulation_steps=4", "--ema_decay=0.9", "--noexport"]
    process, _ = faults.start(tmp_path / "whole", flags)
    _, whole = process.communicate(timeout=300)
    assert process.returncode == 0, whole[-3000:]
    # Killed after a step of epoch 1: nothing of that attempt's steps is kept.
    process, marker = faults.start(tmp_path / "killed", flags, pause_at="train_batch:1")
    faults.kill_when_paused(process, marker)
    process, _ = faults.start(tmp_path / "killed", flags)
    _, resumed = process.communicate(timeout=300)
    assert process.returncode == 0, resumed[-3000:]
    assert fingerprint(resumed) == fingerprint(whole)
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert (summary["optimizer_steps"], summary["gradient_accumulation_steps"]) == (2 * 17, 4)


class RecordAverages(keras.callbacks.Callback):
    """Keeps the averages as the first epoch of an attempt begins (after the backup's restore)."""

    seen = []

    def on_epoch_begin(self, epoch, logs=None):
        if not self.seen:
            self.seen.append((epoch, [a.numpy() for a in self.model.averages]))


@pytest.mark.slow
def test_the_averages_survive_a_resume_and_are_validated_checkpointed_and_exported(
        tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    values = {"ema_decay": 0.9, "early_stopping_patience": 0}
    train.train_and_evaluate(config_of(TINY, workdir, epochs=1, **values))
    backup = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(workdir / "backup" / "chief")))
    saved = backup.get_tensor("model/averages/0/.ATTRIBUTES/VARIABLE_VALUE")
    record = RecordAverages()
    create_callbacks = callbacks_lib.create_callbacks
    monkeypatch.setattr(callbacks_lib, "create_callbacks",
                        lambda *a, **k: [*create_callbacks(*a, **k), record])
    config = config_of(TINY, workdir, epochs=3, **values)  # continues the finished run
    summary = train.train_and_evaluate(config)
    epoch, averages = record.seen[0]
    assert epoch == 1 and np.array_equal(averages[0], saved)  # restored, not started afresh
    # Validation saw the averages: evaluating them again gives the best epoch's accuracy.
    assert summary["final_val_accuracy"] == summary["best_val_accuracy"]
    # The export is the best checkpoint's averages, not its raw weights.
    with tf.distribute.get_strategy().scope():
        network = models.create_model(config.model, 5, 16)
        model = steps.TrainingModel(network.inputs, network.outputs, ema_decay=0.9)
    model.load_weights(str(workdir / "checkpoints" / "best" / "weights")).expect_partial()
    images = IMAGES[:, :16, :16]
    raw = model(images).numpy()
    model.use_averages()
    np.testing.assert_allclose(exported(workdir, images), model(images).numpy(), atol=1e-6)
    assert np.abs(raw - model(images).numpy()).max() > 1e-4


@pytest.mark.slow
def test_averaged_weights_with_label_smoothing_train_as_well_as_without(tmp_path):
    values = {"epochs": 3, "early_stopping_patience": 0, "export": False}
    plain = train.train_and_evaluate(config_of(TINY, tmp_path / "plain", **values))
    extras = train.train_and_evaluate(config_of(TINY, tmp_path / "extras", ema_decay=0.99,
                                                label_smoothing=0.1, **values))
    assert plain["best_val_accuracy"] > 0.5
    assert extras["best_val_accuracy"] >= plain["best_val_accuracy"] - 0.05
