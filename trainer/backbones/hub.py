"""TF Hub image feature vectors (resnet50_hub, any TF2 SavedModel: --backbone=hub) as hub.KerasLayer."""

from __future__ import annotations

import os
from typing import Any

import tensorflow as tf
import tensorflow_hub as hub
import tf_keras as keras

from trainer.backbones import Backbone
from trainer.config import ModelConfig, UserError

HUB_RESNET50_HANDLE = "https://tfhub.dev/google/imagenet/resnet_v1_50/feature_vector/5"


def handle(config: ModelConfig) -> str:
    """The TF Hub handle of a hub backbone: --hub_handle, or the default for it."""
    if config.hub_handle:
        return config.hub_handle
    return HUB_RESNET50_HANDLE


def check_source(config: ModelConfig) -> None:
    """Raises UserError naming --hub_handle when a local handle is not a usable SavedModel."""
    path = handle(config)
    if "://" in path:
        return
    if not os.path.isdir(path):
        raise UserError(f"--hub_handle={path} is neither a URL nor a directory.")
    if os.path.exists(os.path.join(path, "tfhub_module.pb")):
        if config.trainable:
            raise UserError(
                f"--hub_handle={path} is a TF1 Hub module, which cannot be fine-tuned; "
                "use a TF2 SavedModel or --notrainable.")
    elif not os.path.exists(os.path.join(path, "saved_model.pb")):
        raise UserError(f"--hub_handle={path} is not a SavedModel directory "
                        "(no saved_model.pb).")


class HubFeatureVector(hub.KerasLayer):
    """hub.KerasLayer that, while frozen, keeps GradientTape out of the SavedModel's functions.

    Why: a SavedModel's functions are opaque calls in the train step. Their
    gradient functions take constants of the forward pass (a mean's reduction
    axes, a reshape's shape) as outputs of the forward call, and XLA makes every
    input of a call whose output must be a compile-time constant a constant too:
    the image batch and the backbone's weights. Under jit_compile the train step
    then compiled again for nearly every batch. A frozen backbone needs no
    gradient, so none is built. A trainable one needs it: see
    `distribute.choose_jit_compile`.
    """

    def call(self, inputs: tf.Tensor, training: Any = None) -> tf.Tensor:
        outputs = super().call(inputs, training=training)
        return outputs if self.trainable else tf.stop_gradient(outputs)


def build(config: ModelConfig, image_size: int) -> Backbone:
    path = handle(config)
    try:
        # Mixed precision does not reach inside a SavedModel: it keeps its dtypes.
        layer = HubFeatureVector(path, trainable=config.trainable, dtype="float32",
                               name="backbone")
    except Exception as e:
        raise UserError(
            f"--hub_handle={path}: the TF Hub model could not be loaded "
            f"({str(e).splitlines()[0][:200]}). Offline, download the model, extract it and "
            "pass its directory with --hub_handle (set TFHUB_CACHE_DIR to keep downloads)."
        ) from None
    # Hub image models take float32 RGB in [0, 1].
    preprocess = keras.layers.Rescaling(1 / 255, dtype="float32", name="preprocess")
    # Any hub model may hold BatchNorm layers (GroupNorm ones ignore `training`).
    return Backbone(preprocess, layer, has_batch_norm=True, mixed_precision=False)
