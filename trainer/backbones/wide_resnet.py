"""Native Wide ResNet WRN-d-k (Zagoruyko & Komodakis), trained from scratch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.backbones import LAYER_NAME, Spec
from trainer.config import KERAS_BATCH_NORM_MOMENTUM, ModelConfig, UserError

if TYPE_CHECKING:
    import tensorflow as tf
    import tf_keras as keras


def check_fields(config: ModelConfig) -> None:
    """Raises UserError naming --dropout_rate, --wrn_depth or --wrn_width out of range."""
    if not 0.0 <= config.dropout_rate < 1.0:
        raise UserError(f"--dropout_rate must be in [0, 1), got {config.dropout_rate}.")
    if config.wrn_depth < 10 or (config.wrn_depth - 4) % 6:
        raise UserError("--wrn_depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got "
                        f"{config.wrn_depth}.")
    if not 1 <= config.wrn_width <= 16:
        raise UserError(f"--wrn_width must be 1 to 16, got {config.wrn_width}.")


def _wide_block(x: tf.Tensor, width: int, stride: int, dropout_rate: float,
                momentum: float) -> tf.Tensor:
    """Pre-activation basic block with dropout between the convolutions (WRN paper)."""
    import tf_keras as keras

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


def build(config: ModelConfig, image_size: int) -> keras.Model:
    """WRN-d-k: 3 groups of (d-4)/6 blocks, 16k/32k/64k wide; BatchNorm momentum from
    `config.batch_norm_momentum` (None: Keras' default)."""
    import tf_keras as keras

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
    return keras.Model(inputs, features, name=LAYER_NAME)


SPECS = (Spec(
    name="wide_resnet",
    description="native Wide ResNet WRN-d-k from scratch (--wrn_depth, --wrn_width)",
    build=build, input_range="[-1,1]",
    batch_norm=True, native_batch_norm=True, fields=("wrn_depth", "wrn_width", "dropout_rate"),
    check_fields=check_fields,
),)
