"""Native Wide ResNet WRN-d-k (Zagoruyko & Komodakis), trained from scratch."""

from __future__ import annotations

import tensorflow as tf
import tf_keras as keras

from trainer.backbones import Backbone
from trainer.config import KERAS_BATCH_NORM_MOMENTUM, ModelConfig


def _wide_block(x: tf.Tensor, width: int, stride: int, dropout_rate: float,
                momentum: float) -> tf.Tensor:
    """Pre-activation basic block with dropout between the convolutions (WRN paper)."""
    conv = dict(padding="same", use_bias=False, kernel_initializer="he_normal")
    out = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=momentum)(x))
    if stride == 1 and x.shape[-1] == width:
        shortcut = x
    else:
        shortcut = keras.layers.Conv2D(width, 1, strides=stride, **conv)(out)
    y = keras.layers.Conv2D(width, 3, strides=stride, **conv)(out)
    y = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=momentum)(y))
    if dropout_rate > 0:
        y = keras.layers.Dropout(dropout_rate)(y)
    y = keras.layers.Conv2D(width, 3, **conv)(y)
    return keras.layers.Add()([shortcut, y])


def build(config: ModelConfig, image_size: int) -> Backbone:
    """WRN-d-k: 3 groups of (d-4)/6 blocks, 16k/32k/64k wide; BatchNorm momentum from
    `config.batch_norm_momentum` (None: Keras' default)."""
    momentum = config.batch_norm_momentum
    if momentum is None:  # an unresolved config: what the layers would have by default
        momentum = KERAS_BATCH_NORM_MOMENTUM
    blocks_per_group = (config.wrn_depth - 4) // 6
    inputs = keras.Input((image_size, image_size, 3))
    # The paper's CIFAR stem keeps full resolution; larger images are reduced 4x
    # first so 224 px costs about what 56 px would.
    stem_stride = 1 if image_size <= 64 else 4
    x = keras.layers.Conv2D(16, 3, strides=stem_stride, padding="same", use_bias=False,
                            kernel_initializer="he_normal")(inputs)
    for group, stride in enumerate((1, 2, 2)):
        width = 16 * 2**group * config.wrn_width
        for block in range(blocks_per_group):
            x = _wide_block(x, width, stride if block == 0 else 1, config.dropout_rate, momentum)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=momentum)(x))
    features = keras.layers.GlobalAveragePooling2D()(x)
    preprocess = keras.layers.Rescaling(1 / 127.5, offset=-1.0, dtype="float32",
                                        name="preprocess")
    return Backbone(preprocess, keras.Model(inputs, features, name="backbone"),
                    has_batch_norm=True, mixed_precision=True)
