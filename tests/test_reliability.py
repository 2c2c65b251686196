"""Fault injection: SIGKILL, SIGTERM (as PID 1, at start-up, in training, while exporting), a second
run on the same workdir, a diverging loss."""

import csv
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import poison_the_loss, run_main
import faults
from trainer import workdir as workdir_lib
from trainer.config import UserError

SMOKE = ["--experiment=smoke", "--epochs=3", "--precision=float32", "--jit_compile=false"]


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


def pid_1_launcher():
    """The command prefix that makes the trainer PID 1 of a new PID namespace, as in a
    container, where the kernel gives PID 1 no default action for SIGTERM."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return None
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, timeout=30)
    return ["unshare", "--pid", "--fork", "--mount-proc"] if probe.returncode == 0 else None


def trainer_of(process, launcher):
    """The trainer's pid, seen from here: the launcher's child, or the process itself."""
    if not launcher:
        return process.pid
    with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:
        (child,) = f.read().split()
    return int(child)


@pytest.mark.slow
def test_sigterm_while_starting_training_and_exporting_then_rerun_completes(tmp_path):
    launcher = pid_1_launcher()
    if launcher is None and os.environ.get("CI") == "true" and os.geteuid() == 0:
        pytest.fail("CI runs as root: `unshare --pid --fork --mount-proc` must work there")
    # Without root or unshare (a developer's machine), the trainer is a plain child process.
    launcher = launcher or []
    workdir = tmp_path / "run"
    small = ["--synthetic_examples=500", "--image_size=16", "--wrn_width=1"]
    # Through tests/faults.py: the run holds at an event until the test lets it go on.
    argv = [*launcher, sys.executable, faults.SCRIPT, *SMOKE, f"--workdir={workdir}", *small]
    marker, release = tmp_path / "held", tmp_path / "release"
    stops = [
        # Nothing to save yet: exits at once (the config is written before the data is read).
        ("starting", None, lambda: (workdir / "config.json").exists()),
        # Held after epoch 2's first step: a later step stops it; the backup holds epoch 1.
        ("training", "train_batch:2", marker.exists),
        # Held with the export staged: it is published whole, then the run stops.
        ("exporting", "publish:export", marker.exists),
    ]
    for phase, pause_at, condition in stops:
        release.unlink(missing_ok=True)
        log = tmp_path / f"{phase}.log"
        with open(log, "w") as stderr:
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr,
                                       env=faults.environment(marker, pause_at, release=release))
        faults.wait_for(process, condition)
        os.kill(trainer_of(process, launcher), signal.SIGTERM)
        if pause_at:  # lets it go on once the trainer has seen the signal
            faults.wait_for(process, lambda: "SIGTERM received while" in log.read_text())
            release.touch()
        process.wait(timeout=120)
        err = log.read_text()
        assert process.returncode == 143, (phase, err[-2000:])
        assert "Traceback" not in err, err[-2000:]
        assert_every_file_is_whole(workdir)
        assert not (workdir / "summary.json").exists()
        if phase == "starting":
            assert "while starting" in err and "Epoch 1/3" not in err
            assert epochs_in_history(workdir) == []
        if phase == "training":
            assert "stopped during an epoch" in err
            assert epochs_in_history(workdir) in ([1], [1, 2])
        if phase == "exporting":
            assert epochs_in_history(workdir) == [1, 2, 3]
            tf.saved_model.load(str(workdir / "export"))  # published whole
            assert not glob.glob(str(workdir / "export.tmp-*"))
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "Epoch 1/3:" not in rerun.stderr
    assert epochs_in_history(workdir) == [1, 2, 3]
    assert json.loads((workdir / "summary.json").read_text())["epochs_completed"] == 3


# The finite case is the new one (oneDNN kernels); NaN was caught before: slow tier.
@pytest.mark.parametrize("factor", [pytest.param(float("nan"), marks=pytest.mark.slow), 1e6],
                         ids=["nan", "finite_but_absurd"])
def test_diverging_loss_exits_3_keeping_the_best_and_the_last_good_epoch(tmp_path, monkeypatch,
                                                                         capsys, factor):
    workdir = tmp_path / "run"
    steps_per_epoch = 14  # 140 training images in batches of 10
    poison_the_loss(monkeypatch, factor, from_step=steps_per_epoch)
    code, _, err = run_main(["--experiment=smoke", f"--workdir={workdir}", "--synthetic_examples=200",
                             "--image_size=16", "--wrn_width=1", "--batch_size=10", "--epochs=3",
                             "--precision=float32", "--jit_compile=false", "--noexport"], capsys)
    assert code == 3, err[-2000:]
    assert "diverged" in err and "--learning_rate" in err and "Traceback" not in err
    assert epochs_in_history(workdir) == [1]
    assert not (workdir / "summary.json").exists()
    reader = tf.train.load_checkpoint(str(workdir / "checkpoints" / "best"))
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.all(np.isfinite(value)), name
    # The backup holds epoch 1, the last good one, with finite weights: a rerun resumes there.
    backup = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(workdir / "backup" / "chief")))
    assert backup.get_tensor("ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE") == 0
    assert backup.get_tensor("model/optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == steps_per_epoch
    for name in backup.get_variable_to_shape_map():
        value = backup.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.all(np.isfinite(value)), name
