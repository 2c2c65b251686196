"""Keras ResNet50 (random or ImageNet weights), on the caffe-style input its weights expect.

Its BatchNorm layers get `config.batch_norm_momentum` when the run trains their
statistics (resolved by `config.resolve`; None keeps Keras' 0.99).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping

from trainer.backbones import LAYER_NAME, RANDOM_WEIGHTS, Spec, keras_cached_file
from trainer.config import KERAS_BATCH_NORM_MOMENTUM, DataConfig, ModelConfig, UserError
from trainer.preflight import LocalProblem, Need, Remote

if TYPE_CHECKING:
    import tf_keras as keras

MIN_IMAGE_SIZE = 32  # pixels: five stride-2 stages leave at least 1x1
# The no-top ImageNet weights --weights=imagenet loads, as keras.applications fetches them.
IMAGENET_WEIGHTS_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_WEIGHTS_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
                        + IMAGENET_WEIGHTS_FILE)


def pretrained(config: ModelConfig) -> bool:
    """Whether --weights gives trained weights (imagenet or a file)."""
    return config.weights != "none"


def weights(config: Mapping[str, Any]) -> str:
    """imagenet, the weights file, or none (random)."""
    return RANDOM_WEIGHTS if config.get("weights") == "none" else config.get("weights")


def check_fields(config: ModelConfig) -> None:
    """Raises UserError naming --weights when it is empty."""
    if not config.weights:
        raise UserError("--weights must be imagenet, none or a weights file.")


def check(config: ModelConfig, data: DataConfig) -> None:
    """Raises UserError naming --image_size below what the network can reduce."""
    if data.image_size is not None and data.image_size < MIN_IMAGE_SIZE:
        raise UserError(f"--image_size must be at least {MIN_IMAGE_SIZE} for "
                        f"--backbone={config.backbone}, got {data.image_size}.")


def _weights_file_problem(config: ModelConfig) -> str | None:
    if config.weights not in ("imagenet", "none") and not os.path.isfile(config.weights):
        return f"--weights={config.weights} is not a file (nor imagenet or none)."
    return None


def needs(config: ModelConfig) -> list[Need]:
    """A --weights file, or the download of the ImageNet weights when Keras' cache lacks them."""
    problem = _weights_file_problem(config)
    if problem:
        return [LocalProblem("--weights", problem)]
    if config.weights != "imagenet" or keras_cached_file(IMAGENET_WEIGHTS_FILE):
        return []
    return [Remote("--weights", f"the ImageNet weights of ResNet50 ({IMAGENET_WEIGHTS_FILE})",
                   IMAGENET_WEIGHTS_URL, "Offline, copy that file here and pass "
                   "--weights=/path/to/it, or use --weights=none.")]


def check_source(config: ModelConfig) -> None:
    """Raises UserError naming --weights when a weights file does not exist."""
    problem = _weights_file_problem(config)
    if problem:
        raise UserError(problem)


def with_batch_norm_momentum(model: keras.Model, momentum: float) -> keras.Model:
    """A copy of `model` (same weights) whose BatchNormalization layers have `momentum`.

    keras.applications builds its BN layers with Keras' default; a clone with
    their config changed is the public way to another momentum.
    """
    import tf_keras as keras

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        layer_config = layer.get_config()
        if isinstance(layer, keras.layers.BatchNormalization):
            layer_config["momentum"] = momentum
        return layer.__class__.from_config(layer_config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def build(config: ModelConfig, image_size: int) -> keras.Model:
    """keras.applications.ResNet50 without its top, average-pooled, with --weights."""
    import tf_keras as keras

    weights_file = None if config.weights == "none" else config.weights
    shape = (image_size, image_size, 3)
    try:
        resnet = keras.applications.ResNet50(
            include_top=False, weights=weights_file, input_shape=shape, pooling="avg")
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
    return keras.Model(inputs, resnet(inputs), name=LAYER_NAME)


SPECS = (Spec(
    name="resnet50",
    description="Keras ResNet50: ImageNet weights (--weights), random or a weights file",
    build=build, input_range="caffe", pretrained=pretrained, weights=weights,
    batch_norm=True, native_batch_norm=True, fields=("weights",),
    check_fields=check_fields, check=check, needs=needs, check_source=check_source,
    # Against the recipe's own float32 model (trainer.bench), on AVX512-BF16: measured
    # 1.68-1.74 there (docs/benchmark.md); AMX gains about 2x.
    throughput_target=1.7,
),)
