"""End to end: a tiny run writes every artefact; a killed run resumes without repeating epochs."""

import csv
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import backend_context, plugin_data_pb2

from trainer import checks
from trainer import config as config_lib
from trainer import experiments, hparams
from trainer import train
from trainer import workdir as workdir_lib
from trainer.config import UserError

TINY = {"experiment": "smoke", "synthetic_examples": 120, "image_size": 16, "wrn_width": 1,
        "batch_size": 8, "epochs": 2}


def tiny_config(workdir, **values):
    return checks.resolve(config_lib.override(
        experiments.preset("smoke"), {**TINY, "workdir": str(workdir), **values}))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "smoke"
    summary = train.train_and_evaluate(tiny_config(workdir))
    return workdir, summary


def tags(logdir):
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return set(acc.Tags()["tensors"])


def test_run_writes_every_artefact(finished_run):
    workdir, summary = finished_run
    for name in ("config.json", "history.csv", "summary.json", "export/saved_model.pb",
                 "export/labels.txt", "checkpoints/best/weights.index"):
        assert (workdir / name).exists(), name
    assert os.listdir(workdir / "backup")
    assert config_lib.from_json((workdir / "config.json").read_text()) == tiny_config(workdir)
    with open(workdir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "images_per_sec",
            "seconds"} <= set(rows[0])
    assert summary["total_epoch_time_sec"] == pytest.approx(sum(float(r["seconds"]) for r in rows))
    on_disk = json.loads((workdir / "summary.json").read_text())
    assert on_disk == summary
    for key in ("best_val_accuracy", "final_val_accuracy", "epochs_completed", "train_images_per_sec",
                "total_epoch_time_sec", "num_replicas", "precision"):
        assert key in summary, key
    assert summary["epochs_completed"] == 2 and summary["num_replicas"] == 1
    assert summary["best_val_accuracy"] == max(float(row["val_accuracy"]) for row in rows)
    # The export is the best epoch's weights, evaluated again.
    assert summary["final_val_accuracy"] == summary["best_val_accuracy"]
    assert workdir_lib.read_best_checkpoint_epoch(str(workdir))["epoch"] == summary["best_epoch"]
    assert summary["precision"] in ("float32", "mixed_bfloat16")


def test_tensorboard_logs_have_the_expected_tags(finished_run):
    workdir, _ = finished_run
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate", "epoch_images_per_sec",
            "epoch_seconds", "input_images"} <= tags(workdir / "train")
    assert not [tag for tag in tags(workdir / "train") if tag.startswith("epoch_epoch")]
    assert {"epoch_loss", "epoch_accuracy"} <= tags(workdir / "validation")
    assert {"_hparams_/session_start_info", "_hparams_/experiment"} <= tags(workdir)


def hparams_written(logdir):
    """The HParams experiment and session start info at `logdir`, read as TensorBoard reads them."""
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return [plugin_data_pb2.HParamsPluginData.FromString(acc.SummaryMetadata(tag).plugin_data.content)
            for tag in ("_hparams_/experiment", "_hparams_/session_start_info")]


def test_hparams_open_on_the_key_settings_with_the_values_the_run_used(finished_run):
    workdir, summary = finished_run
    experiment_data, start_data = hparams_written(workdir)
    experiment, start = experiment_data.experiment, start_data.session_start_info
    # What TensorBoard's server does with the experiment; its page then shows the first five.
    backend_context._sort_and_reduce_to_hparams_limit(experiment)
    shown = [info.name for info in experiment.hparam_infos][:5]
    assert shown == sorted(["backbone", "weights", "trainable", "learning_rate", "global_batch_size"])
    assert {m.name.tag for m in experiment.metric_infos} == {"epoch_accuracy", "epoch_loss"}
    used = {name: json_format.MessageToDict(value) for name, value in start.hparams.items()}
    assert used["weights"] == "none (random)" and used["dataset"] == "synthetic"
    assert used["precision"] == summary["precision"] and used["trainable"] is True


def test_an_image_folder_run_records_the_folder_as_its_data_and_older_runs_resume(
        tmp_path, image_dir):
    config = tiny_config(tmp_path / "run", image_dir=image_dir)  # the preset names synthetic
    assert config.data.dataset is None  # config.json records no dataset it did not use
    assert hparams.run_values(config_lib.flatten(config))["dataset"] == image_dir
    # The config.json of an earlier version also recorded the --dataset it did not use.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(
        config_lib.to_json(config_lib.override(config, {"dataset": "synthetic"})))
    (tmp_path / "run" / "history.csv").write_text("epoch\n1\n")  # it trained an epoch
    assert workdir_lib.prepare(config, chief=True) is None  # the same run: it resumes


def test_export_serves_uint8_images_with_labels(finished_run):
    workdir, summary = finished_run
    labels = (workdir / "export" / "labels.txt").read_text().split()
    assert len(labels) == summary["num_classes"] == 5
    serve = tf.saved_model.load(str(workdir / "export")).signatures["serving_default"]
    images = tf.constant(np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3)), tf.uint8)
    (probabilities,) = serve(image=images).values()
    assert probabilities.shape == (3, 5)
    np.testing.assert_allclose(probabilities.numpy().sum(axis=1), 1.0, rtol=1e-5)


def test_finished_run_is_left_alone_and_other_settings_are_refused(finished_run):
    workdir, summary = finished_run
    before = {name: (workdir / name).read_text() for name in ("history.csv", "config.json")}
    # Another spelling of the workdir, another strategy: the same run, left alone.
    assert train.train_and_evaluate(tiny_config(f"{workdir}/", strategy="one_device")) == summary
    assert before == {name: (workdir / name).read_text() for name in before}
    with pytest.raises(UserError, match="--learning_rate"):
        train.train_and_evaluate(tiny_config(workdir, learning_rate=0.5))


def test_batch_size_must_divide_over_replicas(tmp_path, monkeypatch):
    config = tiny_config(tmp_path / "run", batch_size=7, strategy="mirrored")
    monkeypatch.setattr(train.distribute, "create_strategy",
                        lambda _: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    with pytest.raises(UserError, match="--batch_size=7 .* 2 replicas"):
        train.train_and_evaluate(config)


def test_attempt_that_trained_no_epoch_accepts_new_settings(tmp_path):
    failed = tiny_config(tmp_path / "run", image_size=20)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(config_lib.to_json(failed))
    corrected = tiny_config(tmp_path / "run")
    assert workdir_lib.prepare(corrected, chief=True) is None
    assert config_lib.from_json((tmp_path / "run" / "config.json").read_text()) == corrected
    (tmp_path / "run" / "history.csv").write_text("epoch\n1\n")  # now an epoch exists
    with pytest.raises(UserError, match="--image_size"):
        workdir_lib.prepare(failed, chief=True)
