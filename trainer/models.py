"""The classification model: preprocessing by input range, the backbone its spec builds, the head.

An uncompiled tf_keras Model on uint8 images: each backbone's spec
(trainer/backbones/) says what input range its network takes, and the
preprocessing layer that makes it is built here, inside the model, so the
input pipeline and the exported model both take uint8 images. Knows nothing
of strategies: call `create_model` inside `strategy.scope()`.
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer import backbones
from trainer.config import ModelConfig, UserError

IMAGENET_BGR_MEANS = (103.939, 116.779, 123.68)  # caffe-style, what keras ResNet50 expects
# Input range -> (scale, offset) of RGB uint8 values (the caffe range has its own layer).
RESCALING = {"[0,1]": (1 / 255, 0.0), "[-1,1]": (1 / 127.5, -1.0)}


class CaffePreprocess(keras.layers.Layer):
    """RGB uint8 -> BGR float minus the ImageNet means (Keras ResNet50 weights)."""

    def call(self, images: tf.Tensor) -> tf.Tensor:
        bgr = tf.cast(images, tf.float32)[..., ::-1]
        return bgr - tf.constant(IMAGENET_BGR_MEANS, tf.float32)


def create_preprocessing(input_range: str) -> keras.layers.Layer:
    """The float32 layer "preprocess": uint8 RGB images -> `input_range` (backbones.INPUT_RANGES)."""
    if input_range == "caffe":
        return CaffePreprocess(dtype="float32", name="preprocess")
    scale, offset = RESCALING[input_range]
    return keras.layers.Rescaling(scale, offset=offset, dtype="float32", name="preprocess")


def create_model(config: ModelConfig, num_classes: int, image_size: int) -> keras.Model:
    """Builds backbone + zero-initialised softmax head on uint8 [batch, size, size, 3].

    A frozen backbone's features pass through `tf.stop_gradient`, so no
    gradient of the backbone is built. Why: a TF Hub SavedModel's functions
    are opaque calls in the train step. Their gradient functions take constants
    of the forward pass (a mean's reduction axes, a reshape's shape) as outputs
    of the forward call, and XLA makes every input of a call whose output must
    be a compile-time constant a constant too: the image batch and the
    backbone's weights. Under jit_compile the train step then compiled again
    for nearly every batch. A frozen backbone needs no gradient. A trainable
    SavedModel needs it: see `distribute.choose_jit_compile`.

    Args:
      config: the model section of the run's Config (trainable already resolved).
      num_classes: size of the softmax output.
      image_size: square input size, pixels.

    Returns:
      An uncompiled model whose output is float32 class probabilities.

    Raises:
      UserError: weights or hub handle cannot be used; names the flag.
    """
    spec = backbones.spec(config.backbone)
    spec.check_source(config)
    network = spec.build(config, image_size)
    network.trainable = config.trainable
    policy = keras.mixed_precision.global_policy().name
    if spec.saved_model and policy != "float32":
        logging.info("The %s backbone does not use reduced precision: TF Hub SavedModels keep "
                     "their saved float32 dtypes and the head computes in float32: nothing "
                     "follows the %s policy.", config.backbone, policy)
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = create_preprocessing(spec.input_range)(inputs)
    # A frozen backbone, or a pretrained BN backbone being fine-tuned on little
    # data, runs its BatchNorm layers in inference mode (fixed statistics).
    keep_statistics = not config.trainable or (config.freeze_batch_norm and spec.pretrained(config))
    if spec.batch_norm and keep_statistics:
        features = network(x, training=False)
    else:
        features = network(x)
    if features.shape.rank != 2:
        raise UserError(
            f"The {config.backbone} backbone outputs shape {features.shape}, not a feature "
            "vector [batch, features]; use a feature_vector model (--hub_handle).")
    if not config.trainable:
        features = tf.stop_gradient(features)
    outputs = keras.layers.Dense(num_classes, activation="softmax", kernel_initializer="zeros",
                                 dtype="float32", name="classifier")(features)
    return keras.Model(inputs, outputs, name=f"{config.backbone}_classifier")
