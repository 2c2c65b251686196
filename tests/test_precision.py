"""What accelerator users run by default, on any x86 CPU: each precision policy with XLA on and off.

Per policy, on a tiny Wide ResNet: a run whose loss diverges in epoch 2 stops
(the backup keeps epoch 1), the rerun resumes there and finishes, the serving
export predicts, the exported backbone trains again as a frozen hub backbone
(which computes in float32 whatever the policy asked). Under XLA, whose CPU
compilation takes most of a tiny run's time, each policy trains and stops on
divergence in one run (resume and exports do not depend on XLA). And XLA
compiles a hub backbone's train step once, not once per batch.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub
import tf_keras as keras
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from trainer import compare, export, predict, train
from trainer import checks
from trainer import config as config_lib
from trainer import experiments
from trainer import workdir as workdir_lib
from trainer.callbacks import TrainingError
from conftest import poison_the_loss

# 32 training and 8 validation images: full batches only, so XLA compiles one shape per step.
TINY = {"synthetic_examples": 40, "val_fraction": 0.2, "image_size": 16, "wrn_width": 1,
        "batch_size": 8, "epochs": 2, "early_stopping_patience": 0, "export_backbone": True}
STEPS_PER_EPOCH = 4
COMPUTE_DTYPE = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


def tiny_config(workdir, **values):
    return checks.resolve(config_lib.override(
        experiments.preset("smoke"), {**TINY, "workdir": str(workdir), **values}))


def recorded_precision(workdir):
    """The precision a finished run gives in its HParams and in compare's report."""
    events = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
    events.Reload()
    metadata = events.SummaryMetadata("_hparams_/session_start_info")
    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        metadata.plugin_data.content).session_start_info.hparams
    row = compare.report_row(compare.read_run(str(workdir), "run"))
    return hparams["precision"].string_value, row["precision"]


def diverge_in_epoch_2(config, monkeypatch):
    """A finite but absurd loss in epoch 2 stops the run like NaN, before the backup.

    Returns:
      history.csv's rows.
    """
    with monkeypatch.context() as patch:
        poison_the_loss(patch, 1e6, from_step=STEPS_PER_EPOCH)
        with pytest.raises(TrainingError, match="diverged"):
            train.train_and_evaluate(config)
    assert keras.mixed_precision.global_policy().name == "float32"  # the caller's, restored
    workdir = config.workdir
    history = workdir_lib.read_history(os.path.join(workdir, workdir_lib.HISTORY_FILE))
    assert [row["epoch"] for row in history] == [1]
    assert np.isfinite(history[0]["loss"]) and history[0]["loss"] < 10
    assert not os.path.exists(os.path.join(workdir, workdir_lib.SUMMARY_FILE))
    backup = tf.train.load_checkpoint(tf.train.latest_checkpoint(
        os.path.join(workdir, workdir_lib.BACKUP_DIR, "chief")))
    assert backup.get_tensor("ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE") == 0  # epoch 1
    return history


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_xla_trains_and_stops_a_diverged_run(tmp_path, monkeypatch, precision):
    diverge_in_epoch_2(tiny_config(tmp_path / "run", precision=precision, jit_compile="true",
                                   export=False, export_backbone=False), monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_train_diverge_resume_export_reuse_and_predict(tmp_path, monkeypatch, precision):
    workdir = tmp_path / "run"
    config = tiny_config(workdir, precision=precision, jit_compile="false")
    history = diverge_in_epoch_2(config, monkeypatch)

    # Resume: the rerun starts at epoch 2 from the backup of epoch 1.
    summary = train.train_and_evaluate(config)
    resumed = workdir_lib.read_history(str(workdir / workdir_lib.HISTORY_FILE))
    assert [row["epoch"] for row in resumed] == [1, 2]
    assert resumed[0] == history[0]  # epoch 1 was not trained again
    assert all(np.isfinite(row["loss"]) and row["loss"] < 10 for row in resumed)
    assert summary["precision"] == precision
    assert summary["backbone_dtype"] == COMPUTE_DTYPE[precision]
    assert summary["head_dtype"] == "float32"
    assert summary["loss_scaling"] == (precision == "mixed_float16")
    assert summary["jit_compile"] is False
    assert recorded_precision(workdir) == (precision, precision)

    # The serving export and trainer.predict: uint8 files in, probabilities out.
    image_path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), np.uint8)).save(image_path)
    classifier = predict.load_classifier(str(workdir / export.EXPORT_DIR))
    (result,) = predict.predict_files(classifier, [str(image_path)], top_k=5)
    probabilities = [p["probability"] for p in result["predictions"]]
    assert len(probabilities) == 5 and abs(sum(probabilities) - 1.0) < 1e-3

    # The exported backbone: a float32 hub feature vector that trains again, frozen.
    backbone_dir = workdir / export.BACKBONE_EXPORT_DIR
    images = tf.constant(np.random.default_rng(1).random((2, 16, 16, 3)), tf.float32)
    before = hub.KerasLayer(str(backbone_dir))(images).numpy()
    assert before.dtype == np.float32 and before.shape == (2, 64)
    reuse = tiny_config(tmp_path / "reuse", backbone="hub", hub_handle=str(backbone_dir),
                        trainable=False, epochs=1, export=False, precision=precision,
                        jit_compile="false")
    reused = train.train_and_evaluate(reuse)
    # A SavedModel keeps its dtypes: nothing computed in reduced precision, no loss scaling.
    assert (reused["precision"], reused["backbone_dtype"], reused["loss_scaling"]) == (
        "float32", "float32", False)
    assert recorded_precision(tmp_path / "reuse") == ("float32", "float32")
    after = hub.KerasLayer(str(tmp_path / "reuse" / export.BACKBONE_EXPORT_DIR))(images).numpy()
    np.testing.assert_array_equal(after, before)


COUNT_COMPILATIONS = """
import sys
import numpy as np
import tensorflow as tf
from trainer import checks, compute, config as config_lib, distribute, train

config = checks.resolve(config_lib.override(config_lib.Config(), {
    "backbone": "hub", "hub_handle": sys.argv[1], "trainable": False, "image_size": 16,
    "precision": "float32", "jit_compile": "true", "workdir": "unused"}))
strategy = tf.distribute.get_strategy()
model = train.create_compiled_model(config, strategy, 3, compute.choose_compute(config, strategy, 12))
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (12 * 8, 16, 16, 3)).astype(np.uint8)
labels = rng.integers(0, 3, 12 * 8)
model.fit(tf.data.Dataset.from_tensor_slices((images, labels)).batch(8), epochs=1, verbose=0)
"""


@pytest.mark.slow
def test_xla_compiles_a_frozen_hub_backbone_once_not_per_batch(tiny_hub_model, tmp_path):
    # XLA's persistent cache keeps one file per compiled program: count them.
    cache = tmp_path / "xla_cache"
    env = {**os.environ, "TF_XLA_FLAGS": f"--tf_xla_persistent_cache_directory={cache}"}
    result = subprocess.run([sys.executable, "-c", COUNT_COMPILATIONS, tiny_hub_model],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    # 12 steps with 12 different batches: the train step compiled once.
    assert len(os.listdir(cache)) == 1, sorted(os.listdir(cache))
