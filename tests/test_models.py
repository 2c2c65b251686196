"""Backbones + head: build, run a training step, precision policies, hub loading."""


import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from trainer import backbones, distribute, models
from trainer.backbones import bit, hub
from trainer.config import ModelConfig, UserError

SIZE = 32


def train_step(model, steps=1, lr=1e-2):
    model.compile(keras.optimizers.SGD(lr), "sparse_categorical_crossentropy")
    images = np.random.default_rng(0).integers(0, 255, (4, SIZE, SIZE, 3), dtype=np.uint8)
    return model.fit(images, np.array([0, 1, 2, 0]), epochs=steps, verbose=0).history["loss"]


def weights_of(layer):
    return [w.numpy().copy() for w in layer.weights]


def changed(before, after):
    return [not np.array_equal(a, b) for a, b in zip(before, after)]


@pytest.mark.parametrize("config", [
    ModelConfig(backbone="wide_resnet", trainable=True, wrn_width=1),
    ModelConfig(backbone="resnet50", weights="none", trainable=True),
], ids=["wide_resnet", "resnet50"])
def test_native_backbones_build_and_train(config):
    model = models.create_model(config, num_classes=3, image_size=SIZE)
    assert model.input.dtype == tf.uint8
    assert model.output.shape == (None, 3) and model.output.dtype == tf.float32
    head = model.get_layer("classifier")
    assert not np.any(head.kernel.numpy())  # zero-initialised head
    before = weights_of(model.get_layer("backbone"))
    loss = train_step(model)
    assert np.isfinite(loss[0])
    assert any(changed(before, weights_of(model.get_layer("backbone"))))


def test_caffe_preprocessing_flips_to_bgr_and_subtracts_means():
    layer = models.CaffePreprocess()
    out = layer(tf.constant([[[[10, 20, 30]]]], tf.uint8)).numpy()
    np.testing.assert_allclose(out[0, 0, 0], [30 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-5)


def test_frozen_hub_backbone_keeps_its_weights(tiny_hub_model):
    config = ModelConfig(backbone="hub", hub_handle=tiny_hub_model, trainable=False)
    model = models.create_model(config, 3, SIZE)
    backbone = model.get_layer("backbone")
    assert not backbone.trainable_weights
    before = weights_of(backbone)
    train_step(model)
    assert not any(changed(before, weights_of(backbone)))
    assert any(np.any(w) for w in model.get_layer("classifier").get_weights())


def test_trainable_hub_backbone_learns_and_keeps_batch_norm_statistics(tiny_hub_model):
    config = ModelConfig(backbone="hub", hub_handle=tiny_hub_model, trainable=True)
    model = models.create_model(config, 3, SIZE)
    backbone = model.get_layer("backbone")
    assert backbone.trainable_weights
    trainable_before = [w.numpy().copy() for w in backbone.trainable_weights]
    stats_before = [w.numpy().copy() for w in backbone.non_trainable_weights]
    train_step(model, steps=2)
    assert all(changed(trainable_before, [w.numpy() for w in backbone.trainable_weights]))
    # Pretrained BN statistics stay fixed while fine-tuning (called with training=False).
    assert not any(changed(stats_before, [w.numpy() for w in backbone.non_trainable_weights]))


def test_hub_handle_errors_name_the_flag(tmp_path, tiny_hub_model):
    with pytest.raises(UserError, match="--hub_handle"):
        models.create_model(ModelConfig(backbone="hub", hub_handle=str(tmp_path / "nope"), trainable=False), 3, SIZE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a SavedModel"):
        models.create_model(ModelConfig(backbone="hub", hub_handle=str(tmp_path / "empty"), trainable=False), 3, SIZE)
    tf1 = tmp_path / "tf1"
    tf1.mkdir()
    (tf1 / "tfhub_module.pb").write_bytes(b"")
    with pytest.raises(UserError, match="TF1 Hub module"):
        models.create_model(ModelConfig(backbone="hub", hub_handle=str(tf1), trainable=True), 3, SIZE)


def test_default_hub_handles():
    assert hub.handle(ModelConfig(backbone="resnet50_hub")) == (
        "https://tfhub.dev/google/imagenet/resnet_v1_50/feature_vector/5")
    # Any TF Hub model, BiT included, through --backbone=hub; --backbone=bit is native.
    bit_hub = "https://tfhub.dev/google/bit/m-r50x1/1"
    assert hub.handle(ModelConfig(backbone="hub", hub_handle=bit_hub)) == bit_hub
    assert backbones.spec("hub") in hub.SPECS and backbones.spec("resnet50_hub") in hub.SPECS
    assert backbones.spec("bit") in bit.SPECS


def test_weights_file_of_the_wrong_architecture_is_a_clear_error(tmp_path):
    path = str(tmp_path / "other.weights.h5")
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save_weights(path)
    with pytest.raises(UserError, match="--weights"):
        models.create_model(ModelConfig(backbone="resnet50", weights=path, trainable=True), 3, SIZE)
    with pytest.raises(UserError, match="--weights"):
        models.create_model(ModelConfig(backbone="resnet50", weights=str(tmp_path / "missing.h5")), 3, SIZE)


@pytest.mark.parametrize("policy, scaled", [("mixed_float16", True), ("mixed_bfloat16", False),
                                            ("float32", False)])
def test_precision_policies_keep_float32_output_and_scale_only_fp16(policy, scaled):
    distribute.set_precision(policy)
    model = models.create_model(ModelConfig(backbone="wide_resnet", trainable=True, wrn_width=1), 3, SIZE)
    assert model.output.dtype == tf.float32
    conv = next(l for l in model.get_layer("backbone").layers if isinstance(l, keras.layers.Conv2D))
    assert conv.compute_dtype == {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}.get(policy, "float32")
    model.compile(keras.optimizers.Adam(), "sparse_categorical_crossentropy")
    assert isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer) == scaled


def test_hub_backbone_stays_float32_under_mixed_precision(tiny_hub_model):
    distribute.set_precision("mixed_bfloat16")
    model = models.create_model(ModelConfig(backbone="hub", hub_handle=tiny_hub_model, trainable=True), 3, SIZE)
    assert model.get_layer("backbone").compute_dtype == "float32"
    assert np.isfinite(train_step(model)[0])
