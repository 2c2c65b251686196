"""Keras ResNet50 (random or ImageNet weights) with the caffe preprocessing its weights expect.

Its BatchNorm layers get `config.batch_norm_momentum` when the run trains their
statistics (resolved by `config.resolve`; None keeps Keras' 0.99).
"""

from __future__ import annotations

import os

import tensorflow as tf
import tf_keras as keras

from trainer.backbones import Backbone
from trainer.config import KERAS_BATCH_NORM_MOMENTUM, ModelConfig, UserError

IMAGENET_BGR_MEANS = (103.939, 116.779, 123.68)  # caffe-style, what keras ResNet50 expects


class CaffePreprocess(keras.layers.Layer):
    """RGB uint8 -> BGR float minus the ImageNet means (Keras ResNet50 weights)."""

    def call(self, images: tf.Tensor) -> tf.Tensor:
        bgr = tf.cast(images, tf.float32)[..., ::-1]
        return bgr - tf.constant(IMAGENET_BGR_MEANS, tf.float32)


def check_source(config: ModelConfig) -> None:
    """Raises UserError naming --weights when a weights file does not exist."""
    if config.weights not in ("imagenet", "none") and not os.path.isfile(config.weights):
        raise UserError(f"--weights={config.weights} is not a file (nor imagenet or none).")


def with_batch_norm_momentum(model: keras.Model, momentum: float) -> keras.Model:
    """A copy of `model` (same weights) whose BatchNormalization layers have `momentum`.

    keras.applications builds its BN layers with Keras' default; a clone with
    their config changed is the public way to another momentum.
    """
    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        layer_config = layer.get_config()
        if isinstance(layer, keras.layers.BatchNormalization):
            layer_config["momentum"] = momentum
        return layer.__class__.from_config(layer_config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def build(config: ModelConfig, image_size: int) -> Backbone:
    weights = None if config.weights == "none" else config.weights
    shape = (image_size, image_size, 3)
    try:
        resnet = keras.applications.ResNet50(
            include_top=False, weights=weights, input_shape=shape, pooling="avg")
    except Exception as e:
        raise UserError(
            f"--weights={config.weights}: the ResNet50 weights could not be loaded "
            f"({str(e).splitlines()[0][:200]}). They must be the no-top ResNet50 weights "
            "(resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5); offline, copy that "
            "file here and pass --weights=/path/to/it, or use --weights=none."
        ) from None
    momentum = config.batch_norm_momentum
    if momentum is not None and momentum != KERAS_BATCH_NORM_MOMENTUM:
        resnet = with_batch_norm_momentum(resnet, momentum)
    inputs = keras.Input(shape)
    network = keras.Model(inputs, resnet(inputs), name="backbone")
    return Backbone(CaffePreprocess(dtype="float32", name="preprocess"), network,
                    has_batch_norm=True, mixed_precision=True)
