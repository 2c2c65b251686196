"""TensorFlow Lite: converting the serving export (float32, float16, dynamic or int8), running a
.tflite file, and its accuracy on the validation split.

`export/model.tflite` takes what the SavedModel takes, uint8 images [batch,
size, size, 3] (signature input `image`), and gives float32 class
probabilities, so `trainer.predict` reads either with the same labels.txt.
TFLite has no bfloat16 and no mixed float16 graphs: a run trained in a mixed
policy is converted from the same weights rebuilt in float32.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer import files, models, sigterm, steps
from trainer.config import Config, UserError
from trainer.data import decode, pipeline
from trainer.data.sources import DataSource

TFLITE_FILE = "model.tflite"  # inside the export directory, beside the SavedModel
CALIBRATION_IMAGES = 200  # training images that set int8's activation ranges
EVALUATION_BATCH = 32  # images per call of the interpreter
FLOAT32_SUFFIX = "_float32"  # export_float32: the float32 rebuild of a mixed-precision run


@contextlib.contextmanager
def interpreter_warning_ignored() -> Iterator[None]:
    """TF 2.21 warns that tf.lite.Interpreter (which int8 calibration runs too) moves to the
    ai-edge-litert package; it works here and needs no other dependency."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter is deprecated")
        yield


def converter_for(saved_model_dir: str, mode: str,
                  calibration: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None,
                  ) -> tf.lite.TFLiteConverter:
    """A converter of the serving SavedModel for --export_tflite=`mode`.

    Args:
      saved_model_dir: a SavedModel whose serving signature takes uint8 `image`.
      mode: float32 (as is); float16 (weights stored in float16); dynamic (int8
        weights, activations quantized on the fly); int8 (weights and
        activations in int8, every op; uint8 input as before).
      calibration: for int8, yields {"image": uint8 [1, size, size, 3]} examples.
    """
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    if mode != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode == "int8":
        converter.representative_dataset = calibration
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
    return converter


def convert(saved_model_dir: str, mode: str,
            calibration: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None) -> bytes:
    """The .tflite file's content (see `converter_for`).

    Raises:
      UserError: the conversion failed; names --export_tflite and says the SavedModel stays.
    """
    try:
        with interpreter_warning_ignored():
            return converter_for(saved_model_dir, mode, calibration).convert()
    except Exception as e:  # the converter raises many types (ConverterError, ValueError, ...)
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(
            f"--export_tflite={mode} could not convert the model ({type(e).__name__}: "
            f"{first_line}). The SavedModel export is written and kept; rerun with another "
            "--export_tflite (float32 converts the most models) or none.") from None


class TFLiteModel:
    """A .tflite classifier: uint8 images [batch, size, size, 3] -> class probabilities."""

    def __init__(self, content: bytes):
        with interpreter_warning_ignored():
            self.interpreter = tf.lite.Interpreter(model_content=content,
                                                   num_threads=os.cpu_count())
        signatures = self.interpreter.get_signature_list()
        if list(signatures) != ["serving_default"] or \
                signatures["serving_default"]["inputs"] != ["image"]:
            raise ValueError(f"no serving_default signature taking `image` ({signatures})")
        self.runner = self.interpreter.get_signature_runner()
        details = self.runner.get_input_details()["image"]
        self.image_size = int(details["shape"][1])
        self.num_classes = int(
            next(iter(self.runner.get_output_details().values()))["shape"][-1])

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities [batch, classes] of uint8 images [batch, size, size, 3]."""
        (probabilities,) = self.runner(image=np.asarray(images, np.uint8)).values()
        return probabilities


def load(path: str) -> TFLiteModel:
    """Reads a .tflite file written by this trainer.

    Raises:
      UserError: it cannot be read or is not a classifier of uint8 `image`; names --model.
    """
    try:
        with open(path, "rb") as f:
            return TFLiteModel(f.read())
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"--model={path} is not a TFLite classifier of this trainer "
                        f"({str(e).splitlines()[0][:200]}).") from None


def accuracy(model: TFLiteModel, dataset: tf.data.Dataset) -> float:
    """Top-1 accuracy on batches of (uint8 images, integer or one-hot labels)."""
    correct = total = 0
    for images, labels in dataset.as_numpy_iterator():
        if labels.ndim == 2:  # one-hot (MixUp runs)
            labels = labels.argmax(axis=1)
        correct += int(np.sum(model.predict(images).argmax(axis=1) == labels))
        total += len(labels)
    return correct / max(total, 1)


def calibration_images(source: DataSource, image_size: int) -> Callable[[], Iterator[dict]]:
    """The first CALIBRATION_IMAGES training images, decoded by the run's own decode stage
    at the model's input size, one per example (what int8's calibration reads)."""
    images = decode.decode_examples(source.examples["train"]().take(CALIBRATION_IMAGES),
                                    image_size, source.encoded)

    def examples() -> Iterator[dict]:
        for image, _ in images.as_numpy_iterator():
            yield {"image": image[np.newaxis]}

    return examples


def float32_saved_model(config: Config, model: keras.Model, num_classes: int,
                        directory: str) -> None:
    """Saves the serving model with `model`'s weights rebuilt in float32 (TFLite converts
    neither bfloat16 nor a mixed float16 graph)."""
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        rebuilt = models.create_model(config.model, num_classes, config.data.image_size)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    rebuilt.set_weights(steps.plain_model(model).get_weights())
    rebuilt.save(directory, save_format="tf", include_optimizer=False)


def export_and_evaluate(config: Config, model: keras.Model, source: DataSource,
                        export_dir: str) -> float | None:
    """Writes export_dir/model.tflite by --export_tflite and returns its validation accuracy
    (None for --export_tflite=none). Call on the chief, after the SavedModel is published.

    Raises:
      UserError: the conversion failed (the SavedModel stays); names --export_tflite.
      sigterm.Preempted: SIGTERM arrived before the conversion.
    """
    mode = config.train.export_tflite
    if mode == "none":
        return None
    sigterm.stop_if_received("writing export/")
    calibration = calibration_images(source, config.data.image_size) if mode == "int8" else None
    if keras.mixed_precision.global_policy().name == "float32":
        content = convert(export_dir, mode, calibration)
    else:  # in the workdir, under a temporary name that a rerun removes if this one is killed
        staged = files.StagedDirectory(export_dir + FLOAT32_SUFFIX)
        try:
            float32_saved_model(config, model, source.num_classes, staged.path)
            content = convert(staged.path, mode, calibration)
        finally:
            staged.discard()
    files.write_atomically(os.path.join(export_dir, TFLITE_FILE), content)
    validation = pipeline.create_dataset(source, "val", EVALUATION_BATCH)
    val_accuracy = accuracy(TFLiteModel(content), validation)
    logging.info("TFLite (%s, %.1f MB) written to %s: val accuracy %.4f.", mode,
                 len(content) / 2**20, os.path.join(export_dir, TFLITE_FILE), val_accuracy)
    return val_accuracy
