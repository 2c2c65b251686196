"""Fault injection: SIGKILL, SIGTERM, a second run on the same workdir, a diverging loss."""

import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import faults
from trainer import config as config_lib
from trainer import train
from trainer import workdir as workdir_lib
from trainer.callbacks import TrainingError
from trainer.config import UserError

SMOKE = ["--experiment=smoke", "--epochs=3"]


def start(workdir, *extra):
    return subprocess.Popen([sys.executable, "-m", "trainer.main", *SMOKE, f"--workdir={workdir}", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(process, condition, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert process.poll() is None, f"exited early: {process.stderr.read()[-2000:]}"
        time.sleep(0.02)
    raise AssertionError("timed out")


def epochs_in_history(workdir):
    path = workdir / "history.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def assert_every_file_is_whole(workdir):
    json.loads((workdir / "config.json").read_text())
    if (workdir / "summary.json").exists():
        json.loads((workdir / "summary.json").read_text())
    epochs = epochs_in_history(workdir)
    assert epochs == list(range(1, len(epochs) + 1))  # each epoch once, in order


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_completes_and_lock_is_never_stale(tmp_path):
    workdir = tmp_path / "run"
    flags = [*SMOKE, "--precision=float32", "--jit_compile=false"]
    # Each kill point is an event the run pauses at (tests/faults.py), then SIGKILL.
    kill_points = [
        ("during epoch 1", "train_batch:1"),  # after its first training step
        ("right after epoch 1's history row and backup", "backup:1"),  # before its best checkpoint
        ("during the export", "publish:export"),  # the SavedModel staged, not yet published
    ]
    for name, event in kill_points:
        process, marker = faults.start(workdir, flags, pause_at=event)
        faults.wait_for(process, lambda: os.path.exists(marker))
        if name == "during epoch 1":
            assert epochs_in_history(workdir) == []
            # A live run holds the workdir: a second run is refused.
            with pytest.raises(UserError, match="in use by another run"):
                with workdir_lib.locked(str(workdir), chief=True):
                    pass
        process.send_signal(signal.SIGKILL)
        _, err = process.communicate()
        assert_every_file_is_whole(workdir)
        if name == "during the export":
            assert "Epoch 1/3:" not in err  # this run had resumed after epoch 1
            assert glob.glob(str(workdir / "export.tmp-*"))
    # The killed run's lock is gone with its process; the rerun takes over.
    final = subprocess.run([sys.executable, "-m", "trainer.main", *flags, f"--workdir={workdir}"],
                           capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert epochs_in_history(workdir) == [1, 2, 3]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["epochs_completed"] == 3
    # The smoke preset's synthetic data has 5 classes (chance 0.2): it must learn.
    assert summary["best_val_accuracy"] > 0.5
    assert not glob.glob(str(workdir / "**" / "*.tmp-*"), recursive=True)
    assert not glob.glob(str(workdir / "**" / "*.old-*"), recursive=True)
    tf.saved_model.load(str(workdir / "export"))


def test_sigterm_saves_progress_exits_143_and_resumes(tmp_path):
    workdir = tmp_path / "run"
    small = ["--noexport", "--synthetic_examples=500"]  # faster; learning is checked above
    process = start(workdir, *small)
    wait_for(process, lambda: len(epochs_in_history(workdir)) >= 1)
    time.sleep(1.0)  # into epoch 2
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert "SIGTERM" in err and "Traceback" not in err
    assert epochs_in_history(workdir) in ([1], [1, 2])
    rerun = subprocess.run([sys.executable, "-m", "trainer.main", *SMOKE, f"--workdir={workdir}", *small],
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "Epoch 1/3:" not in rerun.stderr
    assert epochs_in_history(workdir) == [1, 2, 3]


def test_diverging_loss_stops_with_a_clear_error_and_keeps_the_best(tmp_path, monkeypatch):
    config = config_lib.resolve(config_lib.override(config_lib.preset("smoke"), {
        "workdir": str(tmp_path / "run"), "synthetic_examples": 200, "image_size": 16, "wrn_width": 1,
        "batch_size": 10, "epochs": 3}))
    steps_per_epoch = 14
    # Fault injection: a sane rate for epoch 1, then one that blows the weights up.
    monkeypatch.setattr(train, "create_optimizer", lambda _: keras.optimizers.SGD(
        keras.optimizers.schedules.PiecewiseConstantDecay([steps_per_epoch], [1e-2, 1e30])))
    with pytest.raises(TrainingError, match="--learning_rate"):
        train.train_and_evaluate(config)
    workdir = tmp_path / "run"
    assert epochs_in_history(workdir) == [1]
    assert not (workdir / "summary.json").exists()
    reader = tf.train.load_checkpoint(str(workdir / "checkpoints" / "best"))
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.all(np.isfinite(value)), name
