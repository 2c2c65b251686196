"""The random parts of training input, after the cache: crops and flips per image, MixUp per batch.

They run after the cache, so every epoch draws them anew; evaluation gets none
of them (with MixUp on, only its one-hot labels).
"""

from __future__ import annotations

import tensorflow as tf


def flip_crop(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Random horizontal flip and a random crop from the image padded by 1/8."""
    pad = max(1, image_size // 8)
    image = tf.image.resize_with_crop_or_pad(image, image_size + pad, image_size + pad)
    image = tf.image.random_crop(image, [image_size, image_size, 3])
    return tf.image.random_flip_left_right(image)


def crop_flip(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """A random square crop of `image_size` and a random horizontal flip (BiT's training
    augmentation, on images stored larger: see --resize_size)."""
    image = tf.image.random_crop(image, [image_size, image_size, 3])
    return tf.image.random_flip_left_right(image)


AUGMENTATIONS = {"none": None, "flip_crop": flip_crop, "resize_crop": crop_flip}  # by --augment


def augment_examples(ds: tf.data.Dataset, augment: str, image_size: int) -> tf.data.Dataset:
    """The augment stage: each (uint8 image, label) example -> a random variant of
    `image_size` pixels square, by --augment (see AUGMENTATIONS)."""
    variant = AUGMENTATIONS[augment]
    if variant is None:
        return ds
    return ds.map(lambda image, label: (variant(image, image_size), label),
                  num_parallel_calls=tf.data.AUTOTUNE)


def mixup(images: tf.Tensor, labels: tf.Tensor, alpha: float) -> tuple[tf.Tensor, tf.Tensor]:
    """MixUp of a batch with a random permutation of itself, one weight for the whole batch.

    Args:
      images: uint8 [batch, height, width, 3].
      labels: float32 [batch, classes], one-hot or already soft.
      alpha: the weight is drawn from Beta(alpha, alpha).

    Returns:
      (images, labels) mixed with the same weight: labels exactly, images
      rounded to the nearest uint8 level (the model's input type).
    """
    # Beta(a, a) as X / (X + Y) with X, Y ~ Gamma(a), drawn in float64: with
    # a = 0.1, TF clamps about one float32 draw in 6,000 to float32's smallest
    # normal number, distorting the weight's tails.
    x, y = tf.unstack(tf.random.gamma([2], alpha, dtype=tf.float64))
    weight = tf.cast(x / (x + y), tf.float32)
    partners = tf.random.shuffle(tf.range(tf.shape(images)[0]))
    mixed = (weight * tf.cast(images, tf.float32)
             + (1.0 - weight) * tf.cast(tf.gather(images, partners), tf.float32))
    labels = weight * labels + (1.0 - weight) * tf.gather(labels, partners)
    return tf.cast(tf.round(mixed), tf.uint8), labels


def mixup_batches(ds: tf.data.Dataset, alpha: float, num_classes: int,
                  training: bool) -> tf.data.Dataset:
    """The MixUp stage, on batches: with `alpha` (MixUp on), one-hot labels for every
    split (the loss takes them) and MixUp of each training batch; with 0, the integer
    labels pass untouched."""
    if not alpha:
        return ds
    ds = ds.map(lambda images, labels: (images, tf.one_hot(labels, num_classes)),
                num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        ds = ds.map(lambda images, labels: mixup(images, labels, alpha),
                    num_parallel_calls=tf.data.AUTOTUNE)
    return ds
