"""Encoded image bytes -> uint8 images at the size they are stored at; undecodable files named.

JPEGs are decoded at the smallest DCT scale that still covers the size (libjpeg
then skips most of the work on a large photo), everything is resized (bilinear,
aspect not kept, as the reference) to a square uint8 image. Files TensorFlow's
decoder rejects are left out of the stream and named in the log (DecodeSkips).
"""

from __future__ import annotations

import io
import threading
from typing import Callable

import numpy as np
import tensorflow as tf
from absl import logging
from PIL import Image

JPEG_RATIOS = (1, 2, 4, 8)  # DCT scales libjpeg decodes at: 1/ratio of each side
LOGGED_NAMES = 5  # file names shown in a log line about skipped files


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, "PNG")
    return out.getvalue()


SENTINEL_PNG = _png(1, 1)  # decodes always: marks the end of a stream (see DecodeSkips)


def decode_image(data: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF/BMP bytes to a [size, size, 3] uint8 RGB image."""
    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: decode_jpeg_to_size(data, image_size),
        lambda: tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False))
    return resize(image, image_size)


def jpeg_ratio_index(height: tf.Tensor, width: tf.Tensor, image_size: int) -> tf.Tensor:
    """Index in JPEG_RATIOS of the largest ratio whose DCT-scaled image still has
    at least `image_size` pixels on each side (0, ratio 1, if none has)."""
    short_side = tf.cast(tf.minimum(height, width), tf.int32)
    # libjpeg's scaled side is ceil(side / ratio); the ratios double, so count those that fit.
    return tf.add_n([tf.cast((short_side + r - 1) // r >= image_size, tf.int32)
                     for r in JPEG_RATIOS[1:]])


def decode_jpeg_to_size(data: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decodes a JPEG at the smallest DCT scale that keeps at least `image_size`
    pixels on each side (its size is read from the header): libjpeg then skips
    most of the inverse transform and colour conversion of a large photo."""
    shape = tf.image.extract_jpeg_shape(data)
    # decode_jpeg takes its ratio as an attribute: one branch per scale.
    return tf.switch_case(
        jpeg_ratio_index(shape[0], shape[1], image_size),
        [lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r) for r in JPEG_RATIOS])


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resizes (bilinear, aspect not kept, as the reference) to uint8 [size, size, 3]."""
    image = tf.image.resize(image, [image_size, image_size])
    image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    return tf.ensure_shape(image, [image_size, image_size, 3])


def decode_examples(ds: tf.data.Dataset, image_size: int, encoded: bool,
                    skips: DecodeSkips | None = None) -> tf.data.Dataset:
    """The decode stage: (image, label) examples -> (uint8 [size, size, 3] image, label).

    Args:
      ds: unbatched examples: encoded image bytes when `encoded`, else uint8
        images (synthetic), which are only resized when their size differs.
      image_size: the square size to store the images at, pixels.
      encoded: whether the images are encoded bytes.
      skips: names the examples TensorFlow cannot decode in the log, once the
        stream has been read to its end; without it, they are only dropped
        (with TensorFlow's error logged per file).
    """
    if not encoded:
        if tuple(ds.element_spec[0].shape[:2]) == (image_size, image_size):
            return ds
        return ds.map(lambda image, label: (resize(image, image_size), label),
                      num_parallel_calls=tf.data.AUTOTUNE)
    # The header checks of sources.list_image_folder keep decompression bombs and
    # non-images out; TensorFlow's decoder judges the rest (phone photos with
    # data after the JPEG, cut files). Its error is logged per file.
    if skips is None:
        return ds.map(lambda data, label: (decode_image(data, image_size), label),
                      num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
    ds = skips.numbered(ds).map(
        lambda number, example: (number, decode_image(example[0], image_size), example[1]),
        num_parallel_calls=tf.data.AUTOTUNE)
    return skips.watched(ds.ignore_errors(log_warning=True))


class DecodeSkips:
    """Counts and names the examples of one stream that TensorFlow could not decode.

    The pipeline drops them (ignore_errors). Examples are numbered before
    decoding and followed by one that always decodes (numbered SENTINEL), so a
    gap in the numbers that come through is a dropped example, the last ones
    included; Python runs only at a gap and at the end of a pass, where the
    pass's dropped examples are logged, each once however many passes decode
    (no cache: every epoch does).
    """

    SENTINEL = 2**62  # the number of the example after the last

    def __init__(self, name_of: Callable[[int], str], count: int):
        self._name_of, self._count = name_of, count
        self._pending: list[int] = []  # dropped in this pass, not logged yet
        self._reported: set[int] = set()
        self._lock = threading.Lock()

    def numbered(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        """(encoded image, label) -> (number, (encoded image, label)), sentinel last."""
        label_spec = ds.element_spec[1]
        sentinel = (tf.constant(self.SENTINEL, tf.int64),
                    (tf.constant(SENTINEL_PNG), tf.zeros(label_spec.shape, label_spec.dtype)))
        return ds.enumerate().concatenate(tf.data.Dataset.from_tensors(sentinel))

    def watched(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        """(number, image, label) after ignore_errors -> (image, label), gaps logged."""
        def step(last: tf.Tensor, number: tf.Tensor, image: tf.Tensor,
                 label: tf.Tensor) -> tuple[tf.Tensor, tuple[tf.Tensor, ...]]:
            seen = tf.cond(
                number > last + 1,
                lambda: tf.numpy_function(self._gap, [last + 1, number], tf.bool, stateful=True),
                lambda: tf.constant(True))
            with tf.control_dependencies([seen]):
                return tf.identity(number), (number, image, label)

        ds = ds.scan(tf.constant(-1, tf.int64), lambda last, example: step(last, *example))
        ds = ds.filter(lambda number, image, label: number != self.SENTINEL)
        return ds.map(lambda number, image, label: (image, label))

    def _gap(self, first: np.ndarray, stop: np.ndarray) -> np.bool_:
        with self._lock:
            self._pending += [k for k in range(int(first), min(int(stop), self._count))
                              if k not in self._reported]
            if stop != self.SENTINEL:
                return np.bool_(True)
            dropped, self._pending = self._pending, []
            self._reported.update(dropped)
        if dropped:
            logging.warning(
                "Left out %d of %d images that TensorFlow cannot decode (its error for each "
                "is above): %s", len(dropped), self._count,
                "; ".join(self._name_of(k) for k in dropped[:LOGGED_NAMES])
                + ("; ..." if len(dropped) > LOGGED_NAMES else ""))
        return np.bool_(True)
