"""Strategies, precision choice and TF_CONFIG checks."""

import json

import numpy as np
import pytest
import tensorflow as tf

from trainer import distribute, models, steps
from trainer.config import DataConfig, ModelConfig, TrainConfig, UserError
from trainer.data import pipeline, sources


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


def test_a_hub_backbone_runs_float32_whatever_auto_or_the_flag_picks(monkeypatch):
    strategy = tf.distribute.get_strategy()
    monkeypatch.setattr(distribute, "gpu_compute_capabilities", lambda: [(8, 0)])
    for config in (TrainConfig(precision="auto"), TrainConfig(precision="mixed_float16")):
        policy, why = distribute.choose_precision(config, strategy, backbone_follows_policy=False)
        assert policy == "float32" and "TF Hub SavedModel" in why
    assert distribute.describe_precision("float32", backbone_follows_policy=False) == {
        "precision": "float32", "backbone_dtype": "float32", "head_dtype": "float32",
        "loss_scaling": False}


@pytest.mark.parametrize("policy, backbone, scaling", [
    ("float32", "float32", False), ("mixed_bfloat16", "bfloat16", False),
    ("mixed_float16", "float16", True)])
def test_loss_scaling_only_when_the_backbone_computes_in_float16(policy, backbone, scaling):
    described = distribute.describe_precision(policy)
    assert (described["backbone_dtype"], described["head_dtype"], described["loss_scaling"]) == (
        backbone, "float32", scaling)
    assert distribute.precision_words(described).startswith(f"{policy} (backbone {backbone}, head float32")


def test_jit_compile_auto_is_off_on_cpu_and_overridable(monkeypatch):
    strategy = tf.distribute.get_strategy()
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: [] if kind == "GPU" else ["cpu"])
    assert distribute.choose_jit_compile(TrainConfig(), strategy)[0] is False
    assert distribute.choose_jit_compile(TrainConfig(jit_compile="true"), strategy)[0] is True
    assert distribute.choose_jit_compile(TrainConfig(jit_compile="false"), strategy)[0] is False


def test_jit_compile_auto_on_gpus_leaves_a_trainable_hub_backbone_uncompiled(monkeypatch):
    strategy = tf.distribute.get_strategy()
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: ["gpu"] if kind == "GPU" else ["cpu"])
    assert distribute.choose_jit_compile(TrainConfig(), strategy)[0] is True
    jit, why = distribute.choose_jit_compile(TrainConfig(), strategy, trainable_saved_model=True)
    assert jit is False and "TF Hub" in why
    with pytest.raises(UserError, match="--jit_compile=true"):
        distribute.choose_jit_compile(TrainConfig(jit_compile="true"), strategy,
                                      trainable_saved_model=True)


@pytest.mark.parametrize("config, gpus, tf_config_workers, expected", [
    (TrainConfig(), 0, None, "default"),
    (TrainConfig(), 1, None, "default"),
    (TrainConfig(), 4, None, "mirrored"),
    (TrainConfig(tpu="local"), 0, None, "tpu"),
    # Kubeflow's TFJob and the Indexed Job set TF_CONFIG: every worker trains together.
    (TrainConfig(), 0, ["a:1", "b:2"], "multi_worker"),
    (TrainConfig(), 8, ["a:1", "b:2"], "multi_worker"),
    (TrainConfig(strategy="mirrored"), 4, ["a:1", "b:2"], "mirrored"),
])
def test_strategy_auto_follows_the_hardware_and_tf_config(config, gpus, tf_config_workers, expected):
    parsed = None
    if tf_config_workers:
        parsed = distribute.parse_tf_config(tf_config(tf_config_workers, 1))
    name, why = distribute.choose_strategy(config, gpus, parsed)
    assert name == expected
    if tf_config_workers and config.strategy == "auto":
        assert "TF_CONFIG" in why


def test_multi_worker_without_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UserError, match="TF_CONFIG"):
        distribute.create_strategy(TrainConfig(strategy="multi_worker"))


def test_mirrored_over_two_cpus_splits_the_global_batch():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    source = sources.create_data_source(DataConfig(dataset="synthetic", synthetic_examples=40, image_size=16), 0)
    global_batch = 8
    dist = strategy.distribute_datasets_from_function(lambda ctx: pipeline.create_dataset(
        source, "train", ctx.get_per_replica_batch_size(global_batch), ctx))
    images, labels = next(iter(dist))
    per_replica = strategy.experimental_local_results(images)
    assert [x.shape[0] for x in per_replica] == [4, 4]
    with strategy.scope():
        model = models.create_model(ModelConfig(backbone="wide_resnet", trainable=True, wrn_width=1), 5, 16)
        model.compile(steps.create_optimizer(TrainConfig(learning_rate=1e-3)),
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
