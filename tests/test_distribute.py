"""Strategies, precision choice and TF_CONFIG checks."""

import json

import numpy as np
import pytest
import tensorflow as tf

from trainer import data, distribute, models, train
from trainer.config import DataConfig, ModelConfig, TrainConfig, UserError


def tf_config(workers, index, task_type="worker"):
    return {"TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": task_type, "index": index}})}


def test_valid_tf_config_parses():
    parsed = distribute.parse_tf_config(tf_config(["a:1", "b:2"], 1))
    assert parsed["task"]["index"] == 1
    assert distribute.parse_tf_config({}) is None


@pytest.mark.parametrize("environ, message", [
    ({"TF_CONFIG": "{not json"}, "malformed"),
    ({"TF_CONFIG": json.dumps({"task": {"type": "worker", "index": 0}})}, "malformed"),
    (tf_config(["a:1", "a:1"], 0), "twice"),
    (tf_config(["a:1", "b:2"], 2), "out of range"),
    (tf_config(["a:1"], 0, task_type="ps"), "not in the cluster"),
    (tf_config(["a"], 0), "host:port"),
])
def test_bad_tf_config_is_a_clear_error(environ, message):
    with pytest.raises(UserError, match=message):
        distribute.parse_tf_config(environ)


def test_precision_auto_follows_the_hardware(monkeypatch):
    strategy = tf.distribute.get_strategy()
    auto = TrainConfig(precision="auto")
    monkeypatch.setattr(distribute, "gpu_compute_capabilities", lambda: [])
    monkeypatch.setattr(distribute, "cpu_has_bf16", lambda: True)
    assert distribute.choose_precision(auto, strategy)[0] == "mixed_bfloat16"
    monkeypatch.setattr(distribute, "cpu_has_bf16", lambda: False)
    assert distribute.choose_precision(auto, strategy)[0] == "float32"
    monkeypatch.setattr(distribute, "gpu_compute_capabilities", lambda: [(8, 0), (8, 0)])
    assert distribute.choose_precision(auto, strategy)[0] == "mixed_float16"
    monkeypatch.setattr(distribute, "gpu_compute_capabilities", lambda: [(6, 1)])
    assert distribute.choose_precision(auto, strategy)[0] == "float32"
    assert distribute.choose_precision(TrainConfig(precision="mixed_bfloat16"), strategy) == (
        "mixed_bfloat16", "set by --precision")


def test_jit_compile_auto_is_off_on_cpu_and_overridable():
    strategy = tf.distribute.get_strategy()
    assert distribute.choose_jit_compile(TrainConfig(), strategy)[0] is False
    assert distribute.choose_jit_compile(TrainConfig(jit_compile="true"), strategy)[0] is True


def test_multi_worker_without_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UserError, match="TF_CONFIG"):
        distribute.create_strategy(TrainConfig(strategy="multi_worker"))


def test_mirrored_over_two_cpus_splits_the_global_batch():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    source = data.create_data_source(DataConfig(dataset="synthetic", synthetic_examples=40, image_size=16), 0)
    global_batch = 8
    dist = strategy.distribute_datasets_from_function(
        lambda ctx: source.dataset("train", ctx.get_per_replica_batch_size(global_batch), ctx))
    images, labels = next(iter(dist))
    per_replica = strategy.experimental_local_results(images)
    assert [x.shape[0] for x in per_replica] == [4, 4]
    with strategy.scope():
        model = models.create_model(ModelConfig(backbone="wide_resnet", trainable=True, wrn_width=1), 5, 16)
        model.compile(train.create_optimizer(TrainConfig(learning_rate=1e-3)),
                      "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(dist, steps_per_epoch=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    # Variables are mirrored: both replicas hold the same values after the step.
    kernel = model.get_layer("classifier").kernel
    copies = strategy.experimental_local_results(kernel)
    assert len(copies) == 2 and np.array_equal(copies[0].numpy(), copies[1].numpy())
    assert np.any(copies[0].numpy())


def test_steps_per_execution_fills_a_tpu_and_stays_one_elsewhere(monkeypatch):
    class FakeTPUStrategy:
        """Stands in for TPUStrategy, which needs a TPU to construct."""

    monkeypatch.setattr(tf.distribute, "TPUStrategy", FakeTPUStrategy)
    tpu, cpu = FakeTPUStrategy(), tf.distribute.get_strategy()
    assert distribute.choose_steps_per_execution(TrainConfig(), tpu, 100)[0] == 32
    assert distribute.choose_steps_per_execution(TrainConfig(), tpu, 7)[0] == 7
    assert distribute.choose_steps_per_execution(TrainConfig(), cpu, 100)[0] == 1
    assert distribute.choose_steps_per_execution(TrainConfig(steps_per_execution=4), tpu, 100) == (
        4, "set by --steps_per_execution")
