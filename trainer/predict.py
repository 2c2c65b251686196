"""Prediction with an exported model: the top-k classes of image files, as text or JSON.

  python -m trainer.predict --model=runs/flowers/bit_finetune/export photo1.jpg photos/
  python -m trainer.predict --model=runs/x/export --top_k=1 --json photos/
  python -m trainer.predict --model=runs/x/export/model.tflite photos/

Reads the serving SavedModel and labels.txt that a run writes to workdir/export,
or the TFLite model beside them (--export_tflite) with the same labels.txt.
Files go through training's own checks and decoder: the header check
(trainer.data.folders.check_image_file: empty files, non-images, unsupported formats,
decompression bombs), then TensorFlow's decoder (trainer.data.decode.decode_image),
which judges the rest (data after a JPEG's end is fine, a cut file is not). A
bad file is reported by name and the others are still predicted. Exit code 1
when any file failed, 2 for a usage error (the model or the arguments).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf
from absl import app, flags

from trainer import tflite
from trainer.cli import fail, parse_flags
from trainer.config import UserError
from trainer.data.decode import decode_image
from trainer.data.folders import IMAGE_EXTENSIONS, check_image_file
from trainer.export import LABELS_FILE

BATCH_SIZE = 32  # images per call of the model
EXIT_BAD_FILES = 1


@dataclasses.dataclass(frozen=True)
class Classifier:
    """An exported model: uint8 images [batch, size, size, 3] -> class probabilities."""

    predict: Callable[[np.ndarray], np.ndarray]
    labels: tuple[str, ...]
    image_size: int  # pixels, square


def read_labels(model_dir: str) -> tuple[str, ...]:
    """The class names of an export, one per line of its labels.txt."""
    with open(os.path.join(model_dir, LABELS_FILE)) as f:
        return tuple(line.strip() for line in f if line.strip())


def load_tflite_classifier(path: str) -> Classifier:
    """Loads workdir/export/model.tflite with the labels.txt beside it.

    Raises:
      UserError: the file is not a TFLite classifier of this trainer, or has no labels.
    """
    model_dir = os.path.dirname(path)
    if not os.path.isfile(os.path.join(model_dir, LABELS_FILE)):
        raise UserError(f"--model={path} has no {LABELS_FILE} beside it; pass the "
                        f"{tflite.TFLITE_FILE} of a run's export directory, <workdir>/export.")
    model, labels = tflite.load(path), read_labels(model_dir)
    if model.num_classes != len(labels):
        raise UserError(f"--model={path} gives {model.num_classes} class probabilities, but "
                        f"{LABELS_FILE} beside it has {len(labels)} lines; export it with "
                        "this trainer.")
    return Classifier(model.predict, labels, model.image_size)


def load_classifier(model_dir: str) -> Classifier:
    """Loads workdir/export (serving_default signature and labels.txt), or a .tflite file.

    Raises:
      UserError: the directory is not an export of this trainer.
    """
    if model_dir.endswith(".tflite"):
        return load_tflite_classifier(model_dir)
    labels_path = os.path.join(model_dir, LABELS_FILE)
    if not os.path.isfile(os.path.join(model_dir, "saved_model.pb")) or \
            not os.path.isfile(labels_path):
        raise UserError(f"--model={model_dir} is not an exported model (it needs saved_model.pb "
                        f"and {LABELS_FILE}); pass a run's export directory, <workdir>/export.")
    labels = read_labels(model_dir)
    try:
        serving = tf.saved_model.load(model_dir).signatures.get("serving_default")
    except Exception as e:  # TensorFlow raises many types for a damaged SavedModel
        raise UserError(f"--model={model_dir} cannot be loaded "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from None
    inputs = serving.structured_input_signature[1] if serving is not None else {}
    outputs = serving.structured_outputs if serving is not None else {}
    if list(inputs) != ["image"] or inputs["image"].shape[1] is None or len(outputs) != 1 \
            or list(outputs.values())[0].shape[-1] != len(labels):
        raise UserError(f"--model={model_dir} has no serving_default signature from uint8 "
                        f"`image` [batch, size, size, 3] to {len(labels)} class probabilities "
                        f"(one per line of {LABELS_FILE}); export it with this trainer.")
    image_size = inputs["image"].shape[1]
    (output_name,) = outputs

    def predict(images: np.ndarray) -> np.ndarray:
        return serving(image=tf.constant(images))[output_name].numpy()

    return Classifier(predict, labels, image_size)


def list_images(paths: Sequence[str]) -> list[str]:
    """Files as given, and the image files under directories (recursively, sorted)."""
    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(root, name) for name in sorted(names)
                      if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)]
    return files


def read_image(path: str, image_size: int) -> np.ndarray:
    """Decodes one file to uint8 [size, size, 3] as training did.

    Raises:
      ValueError: the file is missing or not a usable image; says why.
    """
    if not os.path.isfile(path):
        raise ValueError("no such file")
    reason = check_image_file(path)
    if reason:
        raise ValueError(reason)
    try:
        return decode_image(tf.io.read_file(path), image_size).numpy()
    except tf.errors.OpError as e:
        raise ValueError(f"cannot be decoded ({e.message.splitlines()[0][:200]})") from None


def predict_files(classifier: Classifier, files: Sequence[str], top_k: int) -> list[dict[str, Any]]:
    """Top-k predictions per file, in the order given.

    Returns:
      One dict per file: {"file", "predictions": [{"label", "probability"}, ...]}
      or {"file", "error"} for a file that could not be read.
    """
    results: list[dict[str, Any]] = []
    images, pending = [], []  # decoded images waiting for a batch, and their results
    for path in files:
        try:
            images.append(read_image(path, classifier.image_size))
        except ValueError as e:
            results.append({"file": path, "error": str(e)})
            continue
        result = {"file": path}
        pending.append(result)
        results.append(result)
        if len(images) == BATCH_SIZE:
            _fill(classifier, np.stack(images), pending, top_k)
            images, pending = [], []
    if images:
        _fill(classifier, np.stack(images), pending, top_k)
    return results


def _fill(classifier: Classifier, images: np.ndarray, results: list[dict[str, Any]],
          top_k: int) -> None:
    probabilities = classifier.predict(images)
    for result, row in zip(results, probabilities):
        best = np.argsort(-row, kind="stable")[:top_k]
        result["predictions"] = [
            {"label": classifier.labels[i], "probability": float(row[i])} for i in best]


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command's flags. Only `run` calls it, so importing this module
    defines none that could clash with another command's."""
    flags.DEFINE_string("model", None, "A run's export directory (workdir/export), or the "
                        "model.tflite in it.")
    flags.DEFINE_integer("top_k", 3, "Classes shown per image.", lower_bound=1)
    flags.DEFINE_bool("json", False, "Write one JSON list of results to stdout instead of text.")


def main(argv: list[str]) -> None:
    if not FLAGS.model:
        fail("--model is required: a run's export directory (workdir/export) or its model.tflite.")
    files = list_images(argv[1:])
    if not files:
        fail("give image files or directories of images (JPEG, PNG, GIF, BMP) to predict.")
    try:
        classifier = load_classifier(FLAGS.model)
    except UserError as e:
        fail(str(e))
    results = predict_files(classifier, files, min(FLAGS.top_k, len(classifier.labels)))
    if FLAGS.json:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    for result in results:
        if "error" in result:
            sys.stderr.write(f"error: {result['file']}: {result['error']}\n")
        elif not FLAGS.json:
            best = ", ".join(f"{p['label']} {p['probability']:.3f}" for p in result["predictions"])
            sys.stdout.write(f"{result['file']}: {best}\n")
    if any("error" in result for result in results):
        sys.exit(EXIT_BAD_FILES)


def run() -> None:
    """Entry point of `python -m trainer.predict`."""
    define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
