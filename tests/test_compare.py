"""trainer.compare on tiny real runs: report rows match the summaries, pictures, HParams, errors."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf
from PIL import Image
from tensorboard.plugins.hparams import plugin_data_pb2

from trainer import backbones, compare, hparams
from trainer import checks
from trainer import config as config_lib
from trainer import experiments
from trainer import train
from trainer import workdir as workdir_lib

TINY = {"synthetic_examples": 64, "image_size": 16, "wrn_width": 1, "batch_size": 16,
        "export": False}


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """Two finished runs, one interrupted after epoch 1, one that never trained, and a non-run."""
    root = tmp_path_factory.mktemp("runs")
    for name, values in (("fast", {"learning_rate": 1e-2, "epochs": 2}),
                         ("slow", {"learning_rate": 1e-4, "epochs": 1})):
        train.train_and_evaluate(checks.resolve(config_lib.override(
            experiments.preset("smoke"), {**TINY, **values, "workdir": str(root / name)})))
    # An interrupted run: what a kill after epoch 1 leaves (no summary.json).
    shutil.copytree(root / "fast", root / "killed")
    os.remove(root / "killed" / "summary.json")
    lines = (root / "killed" / "history.csv").read_text().splitlines()
    (root / "killed" / "history.csv").write_text("\n".join(lines[:2]) + "\n")
    # A run that failed before its first epoch: config.json only.
    os.makedirs(root / "failed")
    shutil.copy(root / "slow" / "config.json", root / "failed" / "config.json")
    os.makedirs(root / "notes")  # not a run: left out
    return root


@pytest.fixture(scope="module")
def report(parent):
    out = parent / "report"
    return out, compare.compare([str(parent)], str(out))


def summary(parent, name):
    return json.loads((parent / name / "summary.json").read_text())


def test_rows_match_the_runs_and_are_sorted(parent, report):
    _, rows = report
    by_name = {row["run"]: row for row in rows}
    assert set(by_name) == {"fast", "slow", "killed", "failed"}  # not "notes"
    for name in ("fast", "slow"):
        row, done = by_name[name], summary(parent, name)
        config = json.loads((parent / name / "config.json").read_text())
        assert row["status"] == "complete"
        assert row["best_val_accuracy"] == done["best_val_accuracy"]
        assert row["best_epoch"] == done["best_epoch"]
        assert row["final_val_accuracy"] == done["final_val_accuracy"]
        assert row["epochs"] == done["epochs_completed"]
        assert row["train_images_per_sec"] == done["train_images_per_sec"]
        assert row["total_epoch_time_sec"] == done["total_epoch_time_sec"]
        assert row["replicas"] == done["num_replicas"] == 1
        assert row["precision"] == done["precision"]
        assert row["learning_rate"] == config["train"]["learning_rate"]
        assert (row["backbone"], row["weights"], row["trainable"]) == (
            "wide_resnet", "none (random)", True)
    killed = by_name["killed"]
    assert killed["status"] == "partial" and killed["epochs"] == 1
    with open(parent / "fast" / "history.csv") as f:
        first_epoch = next(csv.DictReader(f))
    assert killed["best_val_accuracy"] == float(first_epoch["val_accuracy"])
    assert killed["final_val_accuracy"] is None
    assert by_name["failed"]["status"] == "no epochs"
    assert by_name["failed"]["epochs"] == 0 and by_name["failed"]["best_val_accuracy"] is None

    accuracies = [row["best_val_accuracy"] for row in rows]
    known = [a for a in accuracies if a is not None]
    assert known == sorted(known, reverse=True)
    assert accuracies[-1] is None  # the run without epochs comes last


def test_report_files(report):
    out, rows = report
    with open(out / "report.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == [r["run"] for r in rows]
    assert tuple(table[0]) == compare.COLUMNS
    for written, row in zip(table, rows):
        assert written["status"] == row["status"]
        assert written["best_val_accuracy"] == ("" if row["best_val_accuracy"] is None
                                                else str(row["best_val_accuracy"]))
    markdown = (out / "report.md").read_text()
    for row in rows:
        assert f"| {row['run']} | {row['status']} |" in markdown
    assert "curves.png" in markdown and "loss.png" in markdown
    for picture in ("curves.png", "loss.png"):
        with Image.open(out / picture) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 300


def test_curves_have_one_legend_entry_per_run_with_epochs(parent, tmp_path):
    runs = [compare.read_run(str(parent / name), name) for name in ("fast", "killed", "failed")]
    labels = compare.plot_curves(runs, "accuracy", str(tmp_path / "curves.png"))
    assert labels == ["fast", "killed (partial)"]


def test_hparams_experiment_is_written_once_at_the_parent(parent, report):
    compare.compare([str(parent)], str(parent / "report"))  # a rerun replaces it
    files = [f for f in os.listdir(parent) if f.endswith(compare.HPARAMS_EVENTS_SUFFIX)]
    assert len(files) == 1
    experiments = []
    for event in tf.compat.v1.train.summary_iterator(str(parent / files[0])):
        for value in event.summary.value:
            if value.tag == "_hparams_/experiment":
                data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                experiments.append(data.experiment)
    (experiment,) = experiments
    infos = {info.name: info for info in experiment.hparam_infos}
    assert set(hparams.KEY_HPARAMS) <= set(infos)
    assert "epochs" in infos  # differs between the runs
    assert sorted(v.number_value for v in infos["learning_rate"].domain_discrete.values) == [1e-4, 1e-2]
    # The dashboard opens on five key settings, those that differ first: the rate, and the
    # precision (the unfinished runs only show what they asked for).
    shown = {info.name for info in experiment.hparam_infos if info.differs}
    assert len(shown) == hparams.SHOWN_HPARAMS and shown <= set(hparams.KEY_HPARAMS)
    assert {"learning_rate", "precision", "backbone"} <= shown
    assert hparams.shown_first([{"learning_rate": 1, "dataset": "a"},
                                {"learning_rate": 2, "dataset": "b"}])[:2] == (
        "learning_rate", "dataset")
    metrics = {(m.name.group, m.name.tag) for m in experiment.metric_infos}
    assert ("validation", "epoch_accuracy") in metrics and ("train", "epoch_loss") in metrics


def test_runs_of_earlier_versions_are_read_with_their_names(tmp_path):
    # summary.json called the sum of epoch times wall_time_sec; history.csv epoch_seconds.
    os.makedirs(tmp_path / "old")
    (tmp_path / "old" / "summary.json").write_text(json.dumps({"wall_time_sec": 12.5}))
    row = compare.report_row(compare.read_run(str(tmp_path / "old"), "old"))
    assert row["total_epoch_time_sec"] == 12.5
    resumed = [{"epoch": 1, "epoch_seconds": 2.0, "images_per_sec": 1.0},
               {"epoch": 2, "seconds": 3.0, "images_per_sec": 1.0}]
    assert workdir_lib.summarize(resumed, None)["total_epoch_time_sec"] == 5.0


def test_unreadable_run_is_reported_not_fatal(tmp_path):
    os.makedirs(tmp_path / "broken")
    (tmp_path / "broken" / "summary.json").write_text("{not json")
    run = compare.read_run(str(tmp_path / "broken"), "broken")
    assert run.status.startswith("unreadable: JSONDecodeError")
    assert compare.report_row(run)["best_val_accuracy"] is None


def test_a_missing_run_is_a_row_not_an_error(parent, tmp_path):
    rows = compare.compare([str(parent / "fast"), str(parent / "gone")], str(tmp_path), hparams=False)
    assert [(row["run"], row["status"]) for row in rows] == [("fast", "complete"), ("gone", "missing")]
    with pytest.raises(config_lib.UserError, match="None of"):
        compare.find_runs([str(parent / "gone")])


@pytest.mark.parametrize("values, weights", [
    ({"backbone": "bit", "bit_variant": "m-r50x1", "bit_weights": None},
     "BiT-M-R50x1: https://storage.googleapis.com/bit_models/BiT-M-R50x1.npz"),
    ({"backbone": "bit", "bit_variant": "s-r50x3", "bit_weights": "/w/BiT-S-R50x3.npz"},
     "BiT-S-R50x3: /w/BiT-S-R50x3.npz"),
    ({"backbone": "bit", "bit_variant": "s-r50x3", "bit_weights": "none"}, "none (random)"),
    ({"backbone": "resnet50", "weights": "imagenet"}, "imagenet"),
    ({"backbone": "resnet50", "weights": "none"}, "none (random)"),
    ({"backbone": "resnet50", "weights": "/w/resnet50.h5"}, "/w/resnet50.h5"),
    ({"backbone": "resnet50_hub", "hub_handle": None},
     "hub: https://tfhub.dev/google/imagenet/resnet_v1_50/feature_vector/5"),
    ({"backbone": "hub", "hub_handle": "/models/bit_m-r50x1"}, "hub: /models/bit_m-r50x1"),
    ({"backbone": "wide_resnet"}, "none (random)"),
    ({"backbone": "retired"}, None),
])
def test_the_weights_column_names_what_the_run_started_from(values, weights):
    # A native BiT run is no hub run, whatever its weights.
    assert backbones.weights_of(values) == weights


def test_names_are_made_unique_when_run_directories_share_a_name():
    assert compare.run_names(["a/x", "b/x"]) == ["a/x", "b/x"]
    assert compare.run_names(["a/x", "b/y"]) == ["x", "y"]


def run_cli(*args, command=("-m", "trainer.compare")):
    return subprocess.run([sys.executable, *command, *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_the_report_and_prints_the_table(parent, tmp_path):
    result = run_cli(str(parent / "fast"), str(parent / "slow"), f"--out={tmp_path}", "--nohparams")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("| run | status |")
    assert "| fast | complete |" in result.stdout and "| slow | complete |" in result.stdout
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "loss.png", "report.csv", "report.md"]


def test_cli_refuses_a_directory_that_is_not_a_run(parent):
    wrapper = os.path.join(os.path.dirname(__file__), "..", "scripts", "compare_runs.py")
    result = run_cli(str(parent / "notes"), command=(wrapper,))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: {parent / 'notes'} is not a run directory")
