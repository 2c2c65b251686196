"""What a finished run leaves for reuse: the serving SavedModel and the backbone in TF Hub format."""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
from typing import Iterator

import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer import files

EXPORT_DIR = "export"
BACKBONE_EXPORT_DIR = "export_backbone"
LABELS_FILE = "labels.txt"


class _UncompiledWarning(std_logging.Filter):
    """Drops tf_keras' warning that a model saved without compiling has no built metrics."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return "compiled metrics have yet to be built" not in record.getMessage()


@contextlib.contextmanager
def _without_uncompiled_warning() -> Iterator[None]:
    """The served model is saved uncompiled on purpose (nothing trains it from there), and
    tf_keras warns about it on every save: a line that would only puzzle a reader of the log."""
    logger, quiet = std_logging.getLogger("tensorflow"), _UncompiledWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def export_model(model: keras.Model, class_names: tuple[str, ...], workdir: str,
                 chief: bool) -> None:
    """Writes workdir/export: a SavedModel (uint8 images -> probabilities) and labels.txt.

    Every worker saves (the save may run collectives); only the chief's copy is
    kept. The new export replaces the old one by rename, never half-written.
    """
    with files.staged_directory(os.path.join(workdir, EXPORT_DIR), keep=chief) as staging, \
            _without_uncompiled_warning():
        model.save(staging, save_format="tf", include_optimizer=False)
        files.write_atomically(os.path.join(staging, LABELS_FILE), "\n".join(class_names) + "\n")


def feature_vector(preprocess: keras.layers.Layer, backbone: keras.layers.Layer) -> tf.train.Checkpoint:
    """The backbone as a Reusable SavedModel object (the TF Hub interface).

    `__call__(images, training=False)` maps float32 RGB images in [0, 1] of any
    size [batch, height, width, 3] to float32 [batch, features]; `training`
    switches BatchNorm and dropout as in Keras. `variables`,
    `trainable_variables` and `regularization_losses` are what hub.KerasLayer
    reads. A plain trackable object, not a Keras model: it saves and loads
    several times faster, with nothing Keras-specific inside.
    """

    @tf.function
    def call(images: tf.Tensor, training: bool = False) -> tf.Tensor:
        # Hub image models take [0, 1]; the run's own preprocessing layer expects
        # the 0..255 of uint8 images, whatever mapping its weights need after that.
        features = backbone(preprocess(images * 255.0), training=training)
        # float32 out even when the backbone computed in a mixed policy.
        return tf.cast(features, tf.float32)

    images = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")
    for training in (False, True):
        call.get_concrete_function(images, training=training)
    reusable = tf.train.Checkpoint()
    reusable.__call__ = call
    reusable.variables = list(backbone.weights)
    reusable.trainable_variables = list(backbone.trainable_weights)
    # The backbones built here carry no weight regularizers.
    reusable.regularization_losses = []
    return reusable


def export_backbone(model: keras.Model, image_size: int, workdir: str, chief: bool) -> None:
    """Writes workdir/export_backbone: the trained backbone as a TF2 SavedModel in TF Hub
    feature-vector format (see `feature_vector`), for `--backbone=hub --hub_handle=`
    or `hub.KerasLayer(path, trainable=True)`.

    It computes in the precision the run trained in. Every worker saves; only
    the chief's copy is kept, published by rename as `export_model` does.

    Args:
      model: a model from `models.create_model` (layers "preprocess" and "backbone").
      image_size: the square input size the backbone was trained at, pixels.
      workdir: the run directory.
      chief: whether this process keeps the export.
    """
    preprocess, backbone = model.get_layer("preprocess"), model.get_layer("backbone")
    target = os.path.join(workdir, BACKBONE_EXPORT_DIR)
    # Frozen in this run or not, the export offers its weights for fine-tuning
    # (hub.KerasLayer(trainable=False) still freezes them).
    was_trainable = backbone.trainable
    backbone.trainable = True
    try:
        reusable = feature_vector(preprocess, backbone)
        with files.staged_directory(target, keep=chief) as staging:
            signature = reusable.__call__.get_concrete_function(
                tf.TensorSpec([None, None, None, 3], tf.float32, name="images"))
            tf.saved_model.save(reusable, staging, signatures=signature)
    finally:
        backbone.trainable = was_trainable
    if chief:
        logging.info("Backbone exported to %s (float32 [0, 1] images, trained at %d px -> %d "
                     "features); reuse it with --backbone=hub --hub_handle=%s.", target,
                     image_size, backbone.output_shape[-1], target)
