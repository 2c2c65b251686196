"""The backbone registry and the classification head: an uncompiled tf_keras Model on uint8 images.

Each backbone (trainer/backbones/, one module each) brings the preprocessing its
weights expect, as layers inside the model, so the input pipeline and the
exported model both take uint8 images. Knows nothing of strategies: call
`create_model` inside `strategy.scope()`.
"""

from __future__ import annotations

from types import ModuleType

import tf_keras as keras
from absl import logging

from trainer.backbones import bit, hub, resnet50, wide_resnet
from trainer.config import ModelConfig, UserError, is_pretrained

# Backbone name (--backbone) -> its module (build, optional check_source).
BACKBONES: dict[str, ModuleType] = {
    "resnet50": resnet50,
    "resnet50_hub": hub,
    "bit": bit,
    "hub": hub,
    "wide_resnet": wide_resnet,
}


def check_backbone_source(config: ModelConfig) -> None:
    """Fails fast, before any data is read, on weights or a hub handle that cannot be used.

    Raises:
      UserError: names --weights, --bit_weights or --hub_handle.
    """
    check = getattr(BACKBONES[config.backbone], "check_source", None)
    if check is not None:
        check(config)


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
    backbone = BACKBONES[config.backbone].build(config, image_size)
    backbone.network.trainable = config.trainable
    if not backbone.mixed_precision and keras.mixed_precision.global_policy().name != "float32":
        logging.info("The %s backbone does not use reduced precision: TF Hub SavedModels keep "
                     "their saved float32 dtypes and the head computes in float32: nothing "
                     "follows the %s policy.",
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
