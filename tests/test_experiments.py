"""scripts/run_experiments.sh on tiny runs (skip, resume, retry, keep going) and the stripes task script."""

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import faults
from trainer import config as config_lib
from trainer.data import folders

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "scripts")
RUN_EXPERIMENTS = os.path.join(SCRIPTS, "run_experiments.sh")
TINY = ["--synthetic_examples=64", "--image_size=16", "--wrn_width=1", "--batch_size=16",
        "--epochs=1", "--noexport"]
SIX = ["resnet50_scratch", "resnet50_imagenet_finetune", "resnet50_hub_transfer",
       "resnet50_hub_finetune", "bit_transfer", "bit_finetune"]


def run_script(*args, python=sys.executable, env=None, **popen):
    command = ["bash", RUN_EXPERIMENTS, *args]
    environment = {**os.environ, "PYTHON": python, **(env or {})}
    if popen:
        return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, **popen)
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


pytestmark = pytest.mark.slow  # the tests here run the scripts in subprocesses


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two tiny runs of the smoke preset through the script."""
    workdir = tmp_path_factory.mktemp("sweep")
    result = run_script(f"--workdir={workdir}", "--presets=a=smoke,b=smoke", *TINY)
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir, result


def test_presets_run_in_their_own_directories(sweep):
    workdir, result = sweep
    for name in ("a", "b"):
        summary = json.loads((workdir / name / "summary.json").read_text())
        assert summary["epochs_completed"] == 1
        config = config_lib.from_json((workdir / name / "config.json").read_text())
        assert (config.experiment, config.data.image_size) == ("smoke", 16)
    assert "== all 2 runs complete" in result.stdout


def test_the_runs_share_one_file_cache_and_only_the_first_decodes(sweep):
    workdir, result = sweep
    shared = workdir / "cache"
    names = sorted(n for n in os.listdir(shared) if not n.startswith("."))
    assert [n.split("-")[0] for n in names] == ["train", "val"]  # one entry per split
    assert len({n.rsplit("-", 1)[1] for n in names}) == 1
    assert result.stderr.count("Writing the cache") == 2  # the first run's, for two splits
    assert not any((workdir / name / "cache").exists() for name in ("a", "b"))


def test_complete_runs_are_skipped(sweep):
    workdir, _ = sweep
    before = {name: os.stat(workdir / name / "summary.json").st_mtime_ns for name in ("a", "b")}
    result = run_script(f"--workdir={workdir}", "--presets=a=smoke,b=smoke", *TINY)
    assert result.returncode == 0
    assert result.stdout.count("complete, skipped") == 2
    assert "--experiment=" not in result.stdout  # the trainer was not started
    assert before == {name: os.stat(workdir / name / "summary.json").st_mtime_ns
                      for name in ("a", "b")}


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path):
    args = [f"--workdir={tmp_path}", "--presets=r=smoke", "--synthetic_examples=200",
            "--image_size=16", "--wrn_width=1", "--epochs=2", "--noexport",
            "--precision=float32", "--jit_compile=false"]
    history = tmp_path / "r" / "history.csv"
    # The script's trainer, run through tests/faults.py, pauses when epoch 2 begins
    # (epoch 1 fully recorded) and is killed there: an event, never a race with training.
    marker = tmp_path / "paused"
    paused_trainer = tmp_path / "python"
    paused_trainer.write_text(f'#!/bin/sh\nshift 2  # -m trainer.main\n'
                              f'exec "{sys.executable}" "{faults.SCRIPT}" "$@"\n')
    paused_trainer.chmod(0o755)
    process = run_script(*args, python=str(paused_trainer), start_new_session=True,
                         env={"FAULT_PAUSE_AT": "epoch_begin:2", "FAULT_MARKER": str(marker)})
    faults.wait_for(process, marker.exists)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first_epoch = read_rows(history)
    assert not (tmp_path / "r" / "summary.json").exists() and len(first_epoch) == 1

    result = run_script(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "== r: resuming the interrupted run" in result.stdout
    rows = read_rows(history)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert rows[0] == first_epoch[0]  # epoch 1 was not trained again
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["epochs_completed"] == 2


def test_a_run_that_failed_before_training_is_retried_with_new_flags(tmp_path):
    # Class folders without images: found once the run has started, not by the preflight.
    for name in ("cats", "dogs"):
        (tmp_path / "no_images" / name).mkdir(parents=True)
    result = run_script(f"--workdir={tmp_path}", "--presets=x=smoke", *TINY,
                        f"--image_dir={tmp_path / 'no_images'}")
    assert result.returncode == 1
    assert "no_images must hold at least 2 class sub-folders with images" in result.stderr
    assert "== x: FAILED (exit code 2)" in result.stderr
    assert "1 of 1 runs failed: x" in result.stderr
    assert (tmp_path / "x" / "config.json").exists()  # the failed attempt left its config

    result = run_script(f"--workdir={tmp_path}", "--presets=x=smoke", *TINY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trained no epoch; starting afresh" in result.stderr
    assert (tmp_path / "x" / "summary.json").exists()


@pytest.fixture
def fake_python(tmp_path):
    """Stands in for the trainer: records each command line; the hub transfer preset fails."""
    path = tmp_path / "fake_python"
    path.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done >> "$FAKE_LOG"\n'
                    'echo "--" >> "$FAKE_LOG"\n'
                    'case "$*" in *--experiment=resnet50_hub_transfer*) exit 3;; esac\n')
    path.chmod(0o755)
    return str(path), tmp_path / "calls.log"


def test_the_six_presets_get_the_extra_flags_and_a_failure_does_not_stop_them(tmp_path, fake_python):
    python, log = fake_python
    extra = ["--image_dir=/data/flower photos", "--epochs", "3"]
    result = run_script(f"--workdir={tmp_path}/runs", *extra, python=python,
                        env={"FAKE_LOG": str(log)})
    assert result.returncode == 1
    assert "== resnet50_hub_transfer: FAILED (exit code 3)" in result.stderr
    assert "1 of 6 runs failed: resnet50_hub_transfer" in result.stderr
    calls = [call.strip("\n").split("\n") for call in log.read_text().split("--\n") if call]
    assert calls == [["-m", "trainer.main", f"--experiment={name}",
                      f"--workdir={tmp_path}/runs/{name}", f"--cache={tmp_path}/runs/cache",
                      *extra] for name in SIX]


def test_a_cache_given_replaces_the_shared_one(tmp_path, fake_python):
    python, log = fake_python
    result = run_script(f"--workdir={tmp_path}", "--presets=a=smoke", "--cache", "auto",
                        python=python, env={"FAKE_LOG": str(log)})
    assert result.returncode == 0
    assert log.read_text().split("\n")[4:6] == ["--cache", "auto"]
    assert "--cache=" not in log.read_text()


@pytest.mark.parametrize("args, message", [
    ([], "--workdir=DIR is required"),
    (["--workdir=w", "--experiment=smoke"], "--experiment is chosen per run"),
    (["--workdir=w", "--presets=a=smoke,,b"], "must be NAME or NAME=EXPERIMENT"),
])
def test_usage_errors(args, message):
    result = run_script(*args, python="false")
    assert result.returncode == 2 and message in result.stderr


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stripes_tasks_are_balanced_image_folders_with_disjoint_orientations(tmp_path):
    stripes = load_script("make_stripes_task")
    source = stripes.write_task(str(tmp_path / "source"), "source", 3, 16, seed=1)
    target = stripes.write_task(str(tmp_path / "target"), "target", 3, 16, seed=2)
    assert source == ["stripes_000deg", "stripes_036deg", "stripes_072deg", "stripes_108deg",
                      "stripes_144deg"]
    assert target == ["stripes_018deg", "stripes_054deg", "stripes_090deg", "stripes_126deg",
                      "stripes_162deg"]
    paths, labels, class_names = folders.list_image_folder(str(tmp_path / "target"))
    assert class_names == target and np.bincount(labels).tolist() == [3] * 5
    with Image.open(paths[0]) as image:
        assert image.size == (16, 16) and image.mode == "RGB"
