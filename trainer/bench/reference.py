"""The reference recipe the trainer is measured against: its input pipeline and its model.

The recipe (a notebook's transfer-learning loop on tf_flowers): images decoded
(TFDS decodes them in parallel before the recipe's own code), then
`map(format_image).batch(B).prefetch(1)`, where format_image resizes and
divides by 255 on one thread; nothing cached. The model is float32 without XLA,
compiled with Keras' defaults (one step per call). For --backbone=resnet50 it
is the recipe's own: Keras ResNet50 on /255 images, a softmax layer and
`Adam()`. For every other backbone it is the trainer's own network computing
as a saved model does (float32, no XLA), fed by the recipe's pipeline in uint8
(the trainer's models take uint8 and normalise inside, the same arithmetic as
the recipe's division).
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras as keras

from trainer import backbones, distribute
from trainer import compute as compute_lib
from trainer import train as train_lib
from trainer.config import Config
from trainer.data import decode

# The recipe's compute settings, for the sides built from the trainer's own model.
REFERENCE_COMPUTE = compute_lib.Compute(
    precision="float32", precision_reason="the reference recipe's", backbone_follows_policy=True,
    jit_compile=False, jit_compile_reason="the reference recipe's",
    steps_per_execution=1, steps_per_execution_reason="the reference recipe's")
RECIPE_BACKBONE = "resnet50"  # the one backbone whose reference is the recipe's own model


def input_dtype(backbone: str) -> tf.DType:
    """What the reference pipeline feeds the reference model of `backbone`."""
    return tf.float32 if backbone == RECIPE_BACKBONE else tf.uint8


def dataset(examples: tf.data.Dataset, image_size: int, batch_size: int,
            dtype: tf.DType = tf.float32, repeat: bool = False) -> tf.data.Dataset:
    """The recipe's input: decode, then map(format_image).batch().prefetch(1).

    Args:
      examples: (encoded image, label) pairs: the trainer's training split as it
        reads it from disk (DataSource.examples), so both sides read the same files.
      dtype: float32 divides by 255 as the recipe does; uint8 gives what the
        trainer's models take, at the same cost.
      repeat: loop over the files forever (training), so every batch is full.
    """
    if repeat:
        examples = examples.repeat()
    # TFDS decodes tf_flowers in parallel before the recipe's own map; this stands in for it.
    images = examples.map(
        lambda encoded, label: (tf.io.decode_image(encoded, channels=3, expand_animations=False),
                                label),
        num_parallel_calls=tf.data.AUTOTUNE)

    def format_image(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        if dtype == tf.uint8:
            return decode.resize(image, image_size), label
        return tf.image.resize(image, (image_size, image_size)) / 255.0, label

    return images.map(format_image).batch(batch_size).prefetch(1)


def create_model(config: Config, num_classes: int) -> keras.Model:
    """The reference model for `config.model.backbone` (see the module docstring), compiled."""
    if config.model.backbone != RECIPE_BACKBONE:
        return train_lib.create_compiled_model(config, tf.distribute.get_strategy(), num_classes,
                                               REFERENCE_COMPUTE)
    distribute.set_precision("float32")
    size = config.data.image_size
    network = backbones.spec(RECIPE_BACKBONE).build(config.model, size)
    network.trainable = config.model.trainable
    model = keras.Sequential([keras.Input((size, size, 3)), network,
                              keras.layers.Dense(num_classes, activation="softmax")],
                             name="reference")
    model.compile(optimizer=keras.optimizers.Adam(), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model
