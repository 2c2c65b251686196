"""Encoded image bytes -> uint8 images at the size they are stored at; undecodable files named.

JPEGs are decoded at the smallest DCT scale that still covers the size (libjpeg
then skips most of the work on a large photo), everything is resized (bilinear,
aspect not kept, as the reference) to a square uint8 image. Files TensorFlow's
decoder rejects are left out of the stream and named in the log (DecodeSkips).
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np
import tensorflow as tf
from absl import logging

JPEG_RATIOS = (1, 2, 4, 8)  # DCT scales libjpeg decodes at: 1/ratio of each side
OTHER_FORMATS = len(JPEG_RATIOS)  # the scale group of PNG, GIF, BMP: decoded whole
LOGGED_NAMES = 5  # file names shown in a log line about skipped files


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


def scale_groups(jpeg_shapes: np.ndarray, image_size: int) -> np.ndarray:
    """For each image, the index in JPEG_RATIOS of the DCT scale to decode it at, or
    OTHER_FORMATS (not a JPEG: decoded whole).

    Args:
      jpeg_shapes: int [images, 2], (height, width) of each JPEG, (0, 0) for other formats.
      image_size: the square size the images are stored at, pixels.
    """
    shapes = np.asarray(jpeg_shapes).reshape(-1, 2)
    ratios = np.asarray(jpeg_ratio_index(shapes[:, 0], shapes[:, 1], image_size))
    return np.where(shapes.min(axis=1) > 0, ratios, OTHER_FORMATS).astype(np.int64)


def decode_at_scale(data: tf.Tensor, group: int, image_size: int) -> tf.Tensor:
    """Decodes bytes of one scale group (see scale_groups) to a [size, size, 3] uint8
    RGB image: a JPEG at its DCT scale, anything else whole. No branching: the group
    is a Python number, fixed for the stream."""
    if group == OTHER_FORMATS:
        image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    else:
        image = tf.io.decode_jpeg(data, channels=3, ratio=JPEG_RATIOS[group])
    return resize(image, image_size)


def decode_at_known_scales(examples_at: Callable[[np.ndarray], tf.data.Dataset],
                           positions: np.ndarray, jpeg_shapes: np.ndarray, image_size: int,
                           skips: DecodeSkips) -> tf.data.Dataset:
    """The decode stage where the listing read every header: each JPEG at its DCT scale,
    with no per-image choice in the graph.

    One stream per scale group (scale_groups) decodes its images with one fixed
    decoder, and the streams are put back in the examples' order
    (`choose_from_datasets`, by a selector computed here from the headers);
    files TensorFlow cannot decode are left out and named (`skips`).

    Args:
      examples_at: makes the (encoded image, label) examples at given positions.
      positions: the examples of this pipeline (its shard), in order.
      jpeg_shapes: int [examples, 2] of every example that `examples_at` can make
        (see DataSource.jpeg_shapes).
      image_size: the square size to store the images at, pixels.
      skips: names the examples TensorFlow cannot decode; counts `positions`.

    Returns:
      (uint8 [size, size, 3] image, label) examples, in the order of `positions`.
    """
    groups = scale_groups(jpeg_shapes[positions], image_size)
    # An empty shard (fewer examples than workers) is one empty stream.
    present = np.unique(groups) if len(groups) else np.array([OTHER_FORMATS])
    streams = []
    for group in present:
        numbers = np.flatnonzero(groups == group)  # of the examples in `positions`
        examples = tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices(numbers),
                                       examples_at(positions[numbers]))
        streams.append(examples.map(
            lambda number, example, group=int(group): (
                number, decode_at_scale(example[0], group, image_size), example[1]),
            num_parallel_calls=tf.data.AUTOTUNE))
    if len(streams) == 1:
        return skips.watched(streams[0])
    # A stream's failed decode is an error of the merged stream at that example's
    # place, which skips.watched drops: the streams stay in step with the selector.
    selector = tf.data.Dataset.from_tensor_slices(np.searchsorted(present, groups))
    return skips.watched(tf.data.Dataset.choose_from_datasets(streams, selector))


def decode_examples(ds: tf.data.Dataset, image_size: int, encoded: bool,
                    skips: DecodeSkips | None = None) -> tf.data.Dataset:
    """The decode stage: (image, label) examples -> (uint8 [size, size, 3] image, label).

    Where the listing has read no header (TFDS), each JPEG's scale is read from
    its header in the graph (decode_image); see decode_at_known_scales for folders.

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
    # The header checks of folders.list_image_folder keep decompression bombs and
    # non-images out; TensorFlow's decoder judges the rest (phone photos with
    # data after the JPEG, cut files). Its error is logged per file.
    if skips is None:
        return ds.map(lambda data, label: (decode_image(data, image_size), label),
                      num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
    return skips.watched(ds.enumerate().map(
        lambda number, example: (number, decode_image(example[0], image_size), example[1]),
        num_parallel_calls=tf.data.AUTOTUNE))


class DecodeSkips:
    """Counts and names the examples of one stream that TensorFlow could not decode.

    The pipeline drops them (ignore_errors). Examples carry their number
    through the decoder and are followed by one numbered SENTINEL, so a gap in
    the numbers that come through is a dropped example, the last ones included.
    The numbers are checked a chunk of CHUNK examples at a time, and Python runs
    only at a gap and at the end of a pass, where the pass's dropped examples are
    logged, each once however many passes decode (no cache: every epoch does).
    Per example this costs a copy into a chunk and out of it, where checking each
    example alone ran three more stages with a function call each (docs/benchmark.md).
    """

    SENTINEL = 2**62  # the number of the example after the last
    CHUNK = 32  # examples checked at once

    def __init__(self, name_of: Callable[[int], str], count: int):
        self._name_of, self._count = name_of, count
        self._pending: list[int] = []  # dropped in this pass, not logged yet
        self._reported: set[int] = set()
        self._lock = threading.Lock()

    def watched(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        """(number, decoded image, label), failed decodes included, in order of number ->
        (image, label) of those that decoded; the others logged by name."""
        _, image_spec, label_spec = ds.element_spec
        sentinel = (tf.constant(self.SENTINEL, tf.int64), tf.zeros(image_spec.shape, tf.uint8),
                    tf.zeros(label_spec.shape, label_spec.dtype))
        ds = ds.ignore_errors(log_warning=True).concatenate(tf.data.Dataset.from_tensors(sentinel))

        def check(last: tf.Tensor, chunk: tuple[tf.Tensor, ...],
                  ) -> tuple[tf.Tensor, tuple[tf.Tensor, tf.Tensor]]:
            numbers, images, labels = chunk
            previous = tf.concat([[last], numbers[:-1]], 0)
            seen = tf.cond(
                tf.reduce_any(numbers > previous + 1),
                lambda: tf.numpy_function(self._gaps, [previous, numbers], tf.bool,
                                          stateful=True),
                lambda: tf.constant(True))
            # The sentinel, last of the last chunk, is no example.
            count = tf.size(numbers) - tf.cast(numbers[-1] == self.SENTINEL, tf.int32)
            with tf.control_dependencies([seen]):
                return numbers[-1], (images[:count], labels[:count])

        ds = ds.batch(self.CHUNK).scan(tf.constant(-1, tf.int64), check)
        return ds.unbatch()

    def _gaps(self, previous: np.ndarray, numbers: np.ndarray) -> np.bool_:
        with self._lock:
            for first, stop in zip(previous + 1, numbers):
                self._pending += [k for k in range(int(first), min(int(stop), self._count))
                                  if k not in self._reported]
            if numbers[-1] != self.SENTINEL:
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
