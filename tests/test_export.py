"""--export_backbone: a TF Hub feature vector that reproduces the model's features and trains again."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub
import tf_keras as keras

from trainer import checks
from trainer import config as config_lib
from trainer import experiments
from trainer import export, models, train
from trainer.config import ModelConfig

# Precision and XLA pinned: `auto` picks by the host's CPU (tests/test_precision.py covers each).
TINY = {"synthetic_examples": 64, "image_size": 16, "wrn_width": 1, "batch_size": 16,
        "epochs": 1, "export": False, "precision": "float32", "jit_compile": "false"}


def tiny_config(workdir, **values):
    return checks.resolve(config_lib.override(
        experiments.preset("smoke"), {**TINY, "workdir": str(workdir), **values}))


def features(path, images):
    """The exported feature vector of uint8 images, fed as hub models are: float32 in [0, 1]."""
    return tf.saved_model.load(str(path))(tf.constant(images / 255.0, tf.float32),
                                          training=False).numpy()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny trained run that exported its backbone."""
    workdir = tmp_path_factory.mktemp("pretrain") / "run"
    train.train_and_evaluate(tiny_config(workdir, export_backbone=True))
    return workdir / export.BACKBONE_EXPORT_DIR


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_export_reproduces_the_models_features_of_a_frozen_backbone(tmp_path, images, policy):
    keras.mixed_precision.set_global_policy(policy)  # conftest restores float32
    model = models.create_model(ModelConfig(backbone="wide_resnet", wrn_width=1, trainable=False),
                                num_classes=3, image_size=16)
    export.export_backbone(model, 16, str(tmp_path), chief=True)

    path = tmp_path / export.BACKBONE_EXPORT_DIR
    in_model = keras.Model(model.input, model.get_layer("classifier").input)
    exported = features(path, images)
    assert exported.dtype == np.float32
    # bfloat16 keeps 8 bits of mantissa: [0, 1] * 255 may round differently from uint8.
    tolerance = 1e-5 if policy == "float32" else 3e-2
    np.testing.assert_allclose(exported, in_model(images, training=False).numpy().astype(np.float32),
                               rtol=tolerance, atol=tolerance)
    # Frozen in the run, yet exported trainable so the next run can fine-tune it;
    # the run's own model is left as it was.
    loaded = tf.saved_model.load(str(path))
    backbone = model.get_layer("backbone")
    assert not backbone.trainable
    assert len(loaded.trainable_variables) == len(backbone.weights) - len(
        [w for w in backbone.weights if "moving_" in w.name])
    assert len(loaded.variables) == len(backbone.weights)
    assert list(loaded.regularization_losses) == []
    assert not list(tmp_path.glob("*.tmp-*"))


def test_export_of_a_model_built_under_mirrored_strategy(tmp_path, images):
    # conftest splits the CPU into two logical devices: two replicas.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = models.create_model(ModelConfig(backbone="wide_resnet", wrn_width=1, trainable=True),
                                    num_classes=3, image_size=16)
    export.export_backbone(model, 16, str(tmp_path), chief=True)

    in_model = keras.Model(model.input, model.get_layer("classifier").input)
    np.testing.assert_allclose(features(tmp_path / export.BACKBONE_EXPORT_DIR, images),
                               in_model(images, training=False).numpy(), atol=1e-5)


def test_export_is_a_hub_feature_vector(pretrained, images):
    layer = hub.KerasLayer(str(pretrained), trainable=True)
    out = layer(tf.constant(images / 255.0, tf.float32))
    assert out.dtype == tf.float32 and out.shape == (4, 64)  # WRN-10-1: 64 features
    assert layer.trainable_weights
    # Hub image models accept other sizes than the one trained at.
    assert layer(tf.zeros((2, 24, 24, 3))).shape == (2, 64)


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "fine-tuned"])
def test_round_trip_transfer_from_an_exported_backbone(pretrained, images, tmp_path, trainable):
    workdir = tmp_path / "transfer"
    summary = train.train_and_evaluate(tiny_config(
        workdir, backbone="hub", hub_handle=str(pretrained), trainable=trainable,
        export_backbone=True))

    assert summary["epochs_completed"] == 1
    before, after = features(pretrained, images), features(workdir / "export_backbone", images)
    if trainable:
        assert np.abs(after - before).max() > 1e-3
    else:
        np.testing.assert_array_equal(after, before)
