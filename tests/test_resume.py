"""Resumes keep the whole run's best epoch, its early-stopping count and every history row;
a rerun may extend a run or change the settings that do not change results."""

import glob
import json
import logging
import re

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import faults
from trainer import callbacks as callbacks_lib
from trainer import checks
from trainer import config as config_lib
from trainer import experiments
from trainer import models, train
from trainer import workdir as workdir_lib
from trainer.config import UserError

# Learns well in epoch 1 (val accuracy about 0.6), so gradient ascent is clearly worse.
TINY = {"experiment": "smoke", "synthetic_examples": 200, "image_size": 16, "wrn_width": 1,
        "batch_size": 5, "learning_rate": 5e-3, "precision": "float32", "jit_compile": "false"}
FLAGS = [f"{config_lib.flag(k)}={v}" for k, v in TINY.items()]


def tiny_config(workdir, **values):
    return checks.resolve(config_lib.override(
        experiments.preset("smoke"), {**TINY, "workdir": str(workdir), **values}))


def history(workdir):
    return workdir_lib.read_history(str(workdir / "history.csv"))


def best_checkpoint_epoch(workdir):
    best = workdir_lib.read_best_checkpoint_epoch(str(workdir))
    return best and best["epoch"]


class AscendFrom(keras.callbacks.Callback):
    """Gradient ascent from 1-based epoch `epoch` on: those epochs are worse, for sure."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        rate = float(keras.backend.get_value(self.model.optimizer.learning_rate))
        if epoch + 1 >= self.epoch and rate > 0:
            keras.backend.set_value(self.model.optimizer.learning_rate, -10 * rate)


def assert_exports_the_best_checkpoint(workdir, config):
    """The export computes what a model with checkpoints/best's weights computes."""
    images = tf.constant(np.random.default_rng(1).integers(0, 255, (6, 16, 16, 3)), tf.uint8)
    serve = tf.saved_model.load(str(workdir / "export")).signatures["serving_default"]
    (exported,) = serve(image=images).values()
    model = models.create_model(config.model, 5, 16)
    model.load_weights(str(workdir / "checkpoints" / "best" / "weights")).expect_partial()
    np.testing.assert_allclose(exported.numpy(), model(images, training=False).numpy(), atol=1e-5)


@pytest.mark.slow
def test_kills_around_history_backup_and_export_lose_no_row_and_export_the_best_epoch(tmp_path):
    workdir = tmp_path / "run"
    # Epochs 2 and 3 ascend (worse than 1); patience 2 stops after epoch 3 of 4.
    flags = [*FLAGS, "--epochs=4", "--early_stopping_patience=2"]

    # 1. Killed when epoch 1's history row exists and its backup does not yet.
    process, marker = faults.start(workdir, flags, pause_at="history:1", ascend_from=2)
    faults.kill_when_paused(process, marker)
    assert [row["epoch"] for row in history(workdir)] == [1]

    # 2. The rerun repeats epoch 1 (no backup held it), replaces its row, and is killed
    #    right after epoch 1's backup, before its best checkpoint.
    process, marker = faults.start(workdir, flags, pause_at="backup:1", ascend_from=2)
    err = faults.kill_when_paused(process, marker)
    assert "Epoch 1/4:" in err
    assert [row["epoch"] for row in history(workdir)] == [1]  # once, not lost
    assert best_checkpoint_epoch(workdir) is None

    # 3. Resumes at epoch 2: epoch 1's weights, restored from the backup, become the best
    #    checkpoint; the worse epochs 2 and 3 do not replace them, and patience counts
    #    from epoch 1 (trained by another process): it stops after epoch 3. Killed while
    #    exporting.
    process, marker = faults.start(workdir, flags, pause_at="publish:export", ascend_from=2)
    err = faults.kill_when_paused(process, marker)
    assert "Epoch 1/4:" not in err and "Epoch 4/4:" not in err
    rows = history(workdir)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert max(rows[1]["val_accuracy"], rows[2]["val_accuracy"]) < rows[0]["val_accuracy"]  # the injection worked
    assert best_checkpoint_epoch(workdir) == 1
    assert glob.glob(str(workdir / "export.tmp-*"))  # killed during the export

    # 4. The rerun trains nothing more (early stopping had ended the run) and exports epoch 1.
    process, _ = faults.start(workdir, flags)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert not re.search(r"Epoch \d+/4:", err)
    summary = json.loads((workdir / "summary.json").read_text())
    assert (summary["best_epoch"], summary["epochs_completed"]) == (1, 3)
    assert summary["final_val_accuracy"] == summary["best_val_accuracy"] == rows[0]["val_accuracy"]
    assert not glob.glob(str(workdir / "**" / "*.tmp-*"), recursive=True)
    assert_exports_the_best_checkpoint(workdir, tiny_config(workdir))


@pytest.mark.slow
def test_rerun_after_the_last_epoch_exports_the_best_epoch(tmp_path, monkeypatch):
    """Killed while exporting, early stopping off: the backup holds the last, worse epoch."""
    create_callbacks = callbacks_lib.create_callbacks
    monkeypatch.setattr(callbacks_lib, "create_callbacks",
                        lambda *a, **k: [AscendFrom(2), *create_callbacks(*a, **k)])
    workdir = tmp_path / "run"
    config = tiny_config(workdir, epochs=2, early_stopping_patience=0)
    first = train.train_and_evaluate(tiny_config(workdir, epochs=2, early_stopping_patience=0,
                                                 export=False))
    rows = history(workdir)
    assert rows[1]["val_accuracy"] < rows[0]["val_accuracy"]  # the injection worked
    assert first["best_epoch"] == 1 and first["final_val_accuracy"] == rows[0]["val_accuracy"]
    # What a kill during the export leaves: everything but summary.json and the export.
    (workdir / "summary.json").unlink()
    again = train.train_and_evaluate(config)  # no epoch left to train
    assert again["final_val_accuracy"] == again["best_val_accuracy"] == rows[0]["val_accuracy"]
    assert_exports_the_best_checkpoint(workdir, config)


@pytest.mark.slow
def test_best_epoch_restored_by_the_backup_is_checkpointed_when_its_save_was_killed(tmp_path):
    """Killed after the last epoch's backup, while its best checkpoint was being saved."""
    workdir = tmp_path / "run"
    config = tiny_config(workdir, epochs=1, synthetic_examples=40, export=False)
    first = train.train_and_evaluate(config)
    (workdir / "summary.json").unlink()
    (workdir / "checkpoints" / "best").rename(workdir / "checkpoints" / "best.tmp-999999")
    again = train.train_and_evaluate(config)
    assert again["final_val_accuracy"] == again["best_val_accuracy"] == first["best_val_accuracy"]
    assert best_checkpoint_epoch(workdir) == 1
    assert not (workdir / "checkpoints" / "best.tmp-999999").exists()


def test_publish_killed_between_its_renames_keeps_the_previous_version(tmp_path):
    (tmp_path / "checkpoints" / "best.old-123").mkdir(parents=True)
    (tmp_path / "checkpoints" / "best.old-123" / "epoch.json").write_text('{"epoch": 4}')
    (tmp_path / "checkpoints" / "best.tmp-123").mkdir()  # the new one, maybe incomplete
    (tmp_path / "export.tmp-7").mkdir()
    workdir_lib.remove_stale_temporaries(str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best"]
    assert best_checkpoint_epoch(tmp_path) == 4
    assert not (tmp_path / "export.tmp-7").exists()


@pytest.mark.slow
def test_a_finished_run_continues_with_more_epochs_and_other_attempt_settings(tmp_path, caplog):
    workdir = tmp_path / "run"
    small = {"synthetic_examples": 40, "early_stopping_patience": 0, "export": False}
    first = train.train_and_evaluate(tiny_config(workdir, epochs=1, **small))
    assert first["epochs_completed"] == 1
    # The same run, respelled and on another strategy: settings that do not change results.
    caplog.set_level(logging.INFO, logger="absl")
    longer = tiny_config(f"{workdir}/", epochs=2, strategy="one_device", steps_per_execution=2,
                         **small)
    second = train.train_and_evaluate(longer)
    assert second["epochs_completed"] == 2 and [row["epoch"] for row in history(workdir)] == [1, 2]
    assert "--strategy: auto -> one_device since the last attempt" in caplog.text
    assert "continuing it up to --epochs=2" in caplog.text
    assert config_lib.from_json((workdir / "config.json").read_text()) == longer
    # A finished run is left alone; fewer epochs than done, or another result setting, are refused.
    assert train.train_and_evaluate(longer) == second
    with pytest.raises(UserError, match="--epochs=1 is below the 2 epochs"):
        train.train_and_evaluate(tiny_config(workdir, epochs=1, **small))
    with pytest.raises(UserError, match=r"\(--learning_rate differ\)"):
        train.train_and_evaluate(tiny_config(workdir, epochs=2, **small, learning_rate=1e-3))
