"""Backbones and the classification head: an uncompiled tf_keras Model on uint8 images.

Each backbone brings the preprocessing its weights expect, as layers inside the
model, so the input pipeline and the exported model both take uint8 images.
Knows nothing of strategies: call `create_model` inside `strategy.scope()`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer.config import HUB_BACKBONES, ModelConfig, UserError, is_pretrained

HUB_RESNET50_HANDLE = "https://tfhub.dev/google/imagenet/resnet_v1_50/feature_vector/5"
BIT_HANDLE = "https://tfhub.dev/google/bit/{variant}/1"
IMAGENET_BGR_MEANS = (103.939, 116.779, 123.68)  # caffe-style, what keras ResNet50 expects


@dataclasses.dataclass(frozen=True)
class Backbone:
    preprocess: keras.layers.Layer  # uint8 images -> what `network` expects (float32)
    network: keras.layers.Layer  # images -> [batch, features]
    has_batch_norm: bool  # BN statistics can be frozen with training=False
    mixed_precision: bool  # runs in the global policy (False: kept float32)


class CaffePreprocess(keras.layers.Layer):
    """RGB uint8 -> BGR float minus the ImageNet means (Keras ResNet50 weights)."""

    def call(self, images: tf.Tensor) -> tf.Tensor:
        bgr = tf.cast(images, tf.float32)[..., ::-1]
        return bgr - tf.constant(IMAGENET_BGR_MEANS, tf.float32)


def check_backbone_source(config: ModelConfig) -> None:
    """Fails fast, before any data is read, on a local weights file or hub directory that
    cannot be used.

    Raises:
      UserError: names --weights or --hub_handle.
    """
    if config.backbone == "resnet50" and config.weights not in ("imagenet", "none"):
        if not os.path.isfile(config.weights):
            raise UserError(f"--weights={config.weights} is not a file (nor imagenet or none).")
    if config.backbone not in HUB_BACKBONES:
        return
    handle = hub_handle(config)
    if "://" in handle:
        return
    if not os.path.isdir(handle):
        raise UserError(f"--hub_handle={handle} is neither a URL nor a directory.")
    if os.path.exists(os.path.join(handle, "tfhub_module.pb")):
        if config.trainable:
            raise UserError(
                f"--hub_handle={handle} is a TF1 Hub module, which cannot be fine-tuned; "
                "use a TF2 SavedModel or --notrainable.")
    elif not os.path.exists(os.path.join(handle, "saved_model.pb")):
        raise UserError(f"--hub_handle={handle} is not a SavedModel directory "
                        "(no saved_model.pb).")


def _keras_resnet50(config: ModelConfig, image_size: int) -> Backbone:
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
    inputs = keras.Input(shape)
    network = keras.Model(inputs, resnet(inputs), name="backbone")
    return Backbone(CaffePreprocess(dtype="float32", name="preprocess"), network,
                    has_batch_norm=True, mixed_precision=True)


def hub_handle(config: ModelConfig) -> str:
    """The TF Hub handle of a hub backbone: --hub_handle, or the default for it."""
    if config.hub_handle:
        return config.hub_handle
    if config.backbone == "bit":
        return BIT_HANDLE.format(variant=config.bit_variant)
    return HUB_RESNET50_HANDLE


def _hub_backbone(config: ModelConfig, image_size: int) -> Backbone:
    import tensorflow_hub as hub  # imported here: only hub backbones pay for it

    handle = hub_handle(config)
    try:
        # Mixed precision does not reach inside a SavedModel: it keeps its dtypes.
        layer = hub.KerasLayer(handle, trainable=config.trainable, dtype="float32",
                               name="backbone")
    except Exception as e:
        raise UserError(
            f"--hub_handle={handle}: the TF Hub model could not be loaded "
            f"({str(e).splitlines()[0][:200]}). Offline, download the model, extract it and "
            "pass its directory with --hub_handle (set TFHUB_CACHE_DIR to keep downloads)."
        ) from None
    # Hub image models take float32 RGB in [0, 1].
    preprocess = keras.layers.Rescaling(1 / 255, dtype="float32", name="preprocess")
    # BiT uses GroupNorm; other hub models may hold BatchNorm layers.
    return Backbone(preprocess, layer, has_batch_norm=config.backbone != "bit",
                    mixed_precision=False)


def _wide_block(x: tf.Tensor, width: int, stride: int, dropout_rate: float) -> tf.Tensor:
    """Pre-activation basic block with dropout between the convolutions (WRN paper)."""
    conv = dict(padding="same", use_bias=False, kernel_initializer="he_normal")
    out = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    if stride == 1 and x.shape[-1] == width:
        shortcut = x
    else:
        shortcut = keras.layers.Conv2D(width, 1, strides=stride, **conv)(out)
    y = keras.layers.Conv2D(width, 3, strides=stride, **conv)(out)
    y = keras.layers.ReLU()(keras.layers.BatchNormalization()(y))
    if dropout_rate > 0:
        y = keras.layers.Dropout(dropout_rate)(y)
    y = keras.layers.Conv2D(width, 3, **conv)(y)
    return keras.layers.Add()([shortcut, y])


def _wide_resnet(config: ModelConfig, image_size: int) -> Backbone:
    """WRN-d-k (Zagoruyko & Komodakis): 3 groups of (d-4)/6 blocks, 16k/32k/64k wide."""
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
            x = _wide_block(x, width, stride if block == 0 else 1, config.dropout_rate)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    features = keras.layers.GlobalAveragePooling2D()(x)
    preprocess = keras.layers.Rescaling(1 / 127.5, offset=-1.0, dtype="float32",
                                        name="preprocess")
    return Backbone(preprocess, keras.Model(inputs, features, name="backbone"),
                    has_batch_norm=True, mixed_precision=True)


BACKBONES: dict[str, Callable[[ModelConfig, int], Backbone]] = {
    "resnet50": _keras_resnet50,
    "resnet50_hub": _hub_backbone,
    "bit": _hub_backbone,
    "hub": _hub_backbone,
    "wide_resnet": _wide_resnet,
}


def create_model(config: ModelConfig, num_classes: int, image_size: int) -> keras.Model:
    """Builds backbone + zero-initialised softmax head on uint8 [batch, size, size, 3].

    Args:
      config: the model section of the run's Config (trainable already resolved).
      num_classes: size of the softmax output.
      image_size: square input size, pixels.

    Returns:
      An uncompiled model whose output is float32 class probabilities.

    Raises:
      UserError: weights or hub handle cannot be used; names the flag.
    """
    check_backbone_source(config)
    backbone = BACKBONES[config.backbone](config, image_size)
    backbone.network.trainable = config.trainable
    if not backbone.mixed_precision and keras.mixed_precision.global_policy().name != "float32":
        logging.info("The %s backbone does not use reduced precision: TF Hub SavedModels keep "
                     "their saved float32 dtypes; only the head follows the %s policy.",
                     config.backbone, keras.mixed_precision.global_policy().name)
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = backbone.preprocess(inputs)
    # A frozen backbone, or a pretrained BN backbone being fine-tuned on little
    # data, runs its BatchNorm layers in inference mode (fixed statistics).
    keep_statistics = not config.trainable or (config.freeze_batch_norm and is_pretrained(config))
    if backbone.has_batch_norm and keep_statistics:
        features = backbone.network(x, training=False)
    else:
        features = backbone.network(x)
    if features.shape.rank != 2:
        raise UserError(
            f"The {config.backbone} backbone outputs shape {features.shape}, not a feature "
            "vector [batch, features]; use a feature_vector model (--hub_handle).")
    outputs = keras.layers.Dense(num_classes, activation="softmax", kernel_initializer="zeros",
                                 dtype="float32", name="classifier")(features)
    return keras.Model(inputs, outputs, name=f"{config.backbone}_classifier")
