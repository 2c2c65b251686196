"""Input data: TFDS, image folders and synthetic images as tf.data pipelines.

Each split runs decode -> resize -> uint8 -> cache -> shuffle -> augment ->
batch -> [MixUp] -> prefetch. Images stay uint8 up to the model (which
normalises them), so a cache holds a quarter of what float32 images would take.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import socket
import urllib.parse
from typing import Callable

import numpy as np
import tensorflow as tf
from absl import logging
from PIL import Image

from trainer.config import DataConfig, UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Formats TensorFlow's decode_image reads (MPO: multi-picture JPEG from cameras).
DECODABLE_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP")
# Decompression-bomb cap: a header announcing more pixels than this is skipped
# before anything is decoded (about 7,000 x 7,000).
MAX_IMAGE_PIXELS = 50_000_000
SHUFFLE_BUFFER = 2048  # images; splits are already randomly ordered once
SYNTHETIC_CLASSES = 5
SYNTHETIC_IMAGE_SIZE = 224  # pixels: synthetic images when --image_size is left to a rule
SIZE_SAMPLE = 100  # training images whose headers give the dataset's typical size
AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A dataset split into train and validation, ready to become pipelines.

    `examples[split]` makes the split's unbatched (image, label) dataset: encoded
    image bytes when `encoded`, else uint8 images already at the input size.
    """

    config: DataConfig
    seed: int
    class_names: tuple[str, ...]
    sizes: dict[str, int]  # examples per split: "train", "val"
    examples: dict[str, Callable[[], tf.data.Dataset]]
    encoded: bool
    identity: str  # what the examples are, for file-cache names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def dataset(
        self,
        split: str,
        per_replica_batch_size: int,
        input_context: tf.distribute.InputContext | None = None,
    ) -> tf.data.Dataset:
        """Returns the batched pipeline of one input pipeline (worker) for `split`.

        Training data is sharded by example across input pipelines, shuffled,
        augmented and repeated forever (fit counts steps_per_epoch); validation
        data is read whole by every pipeline, so metrics are exact and no worker
        waits on an uneven shard.
        """
        training = split == "train"
        ds = self.examples[split]()
        num_pipelines = input_context.num_input_pipelines if input_context else 1
        pipeline_id = input_context.input_pipeline_id if input_context else 0
        if training and num_pipelines > 1:
            ds = ds.shard(num_pipelines, pipeline_id)
        ds = self._decoded(ds, self._stored_size(split))
        if self.config.cache == "memory":
            ds = ds.cache()
        elif self.config.cache != "none":
            ds = ds.cache(self._cache_file(split, pipeline_id, num_pipelines))
        if training:
            ds = ds.shuffle(SHUFFLE_BUFFER, seed=self.seed, reshuffle_each_iteration=True)
            ds = ds.repeat()
            ds = self._augmented(ds)
        ds = self._mixed(ds.batch(per_replica_batch_size, drop_remainder=training), training)
        return ds.prefetch(AUTOTUNE)

    def preview(self, count: int) -> tf.Tensor:
        """Returns up to `count` training images as the model sees them (uint8)."""
        ds = self._decoded(self.examples["train"]().take(count), self._stored_size("train"))
        ds = self._mixed(self._augmented(ds).batch(count), training=True)
        return next(iter(ds))[0]

    def typical_image_size(self) -> tuple[int, int]:
        """(height, width) of the median-area image among the first training examples.

        Encoded images are measured from their headers (nothing is decoded), up
        to SIZE_SAMPLE of them; synthetic images all have their generated size.
        """
        if not self.encoded:
            height, width = self.examples["train"]().element_spec[0].shape[:2]
            return int(height), int(width)
        sizes = []
        for encoded, _ in self.examples["train"]().take(SIZE_SAMPLE).as_numpy_iterator():
            try:
                with Image.open(io.BytesIO(encoded)) as image:
                    sizes.append((image.height, image.width))
            except Exception:  # PIL raises many types; the pipeline skips such files too
                continue
        if not sizes:
            raise UserError("None of the first training images could be read to measure their "
                            "size; pass --image_size (and --resize_size).")
        return sorted(sizes, key=lambda hw: hw[0] * hw[1])[len(sizes) // 2]

    def _stored_size(self, split: str) -> int:
        # Random resized crops keep the training images larger until the crop.
        if split == "train" and self.config.augment == "resize_crop":
            return self.config.resize_size
        return self.config.image_size

    def _decoded(self, ds: tf.data.Dataset, size: int) -> tf.data.Dataset:
        if not self.encoded:
            if tuple(ds.element_spec[0].shape[:2]) == (size, size):
                return ds
            return ds.map(lambda image, label: (resize(image, size), label),
                          num_parallel_calls=AUTOTUNE)
        ds = ds.map(lambda data, label: (decode_image(data, size), label),
                    num_parallel_calls=AUTOTUNE)
        # Files were checked before (see list_image_folder); this drops the rare
        # file whose header is fine but whose body is not, with a warning each.
        return ds.ignore_errors(log_warning=True)

    def _augmented(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        augment = {"none": None, "flip_crop": flip_crop, "resize_crop": crop_flip}[self.config.augment]
        if augment is None:
            return ds
        size = self.config.image_size
        return ds.map(lambda image, label: (augment(image, size), label),
                      num_parallel_calls=AUTOTUNE)

    def _mixed(self, ds: tf.data.Dataset, training: bool) -> tf.data.Dataset:
        """With MixUp on, one-hot labels for every split (the loss takes them), and
        MixUp of each training batch. Off, the integer labels pass untouched."""
        alpha = self.config.mixup_alpha
        if not alpha:
            return ds
        ds = ds.map(lambda images, labels: (images, tf.one_hot(labels, self.num_classes)),
                    num_parallel_calls=AUTOTUNE)
        if training:
            ds = ds.map(lambda images, labels: mixup(images, labels, alpha),
                        num_parallel_calls=AUTOTUNE)
        return ds

    def _cache_file(self, split: str, pipeline_id: int, num_pipelines: int) -> str:
        # Named by everything that changes the cached images, so a changed
        # config never reads a stale cache.
        key = json.dumps([self.identity, self._stored_size(split), self.config.val_fraction,
                          self.seed, split, pipeline_id, num_pipelines])
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        path = f"{self.config.cache}-{split}-{digest}-{pipeline_id}of{num_pipelines}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return path


def decode_image(data: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF/BMP bytes to a [size, size, 3] uint8 RGB image."""
    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    return resize(image, image_size)


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resizes (bilinear, aspect not kept, as the reference) to uint8 [size, size, 3]."""
    image = tf.image.resize(image, [image_size, image_size])
    image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    return tf.ensure_shape(image, [image_size, image_size, 3])


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


def create_data_source(config: DataConfig, seed: int) -> DataSource:
    """Resolves the data the config names: an image folder, synthetic, or TFDS.

    Raises:
      UserError: the data cannot be found or read; names the flag to fix.
    """
    if config.image_dir:
        return _image_folder_source(config, seed)
    if config.dataset == "synthetic":
        return _synthetic_source(config, seed)
    return _tfds_source(config, seed)


def split_sizes(num_examples: int, val_fraction: float, what: str) -> tuple[int, int]:
    """Returns (train, val) counts; raises UserError when either would be empty."""
    num_val = round(num_examples * val_fraction)
    num_train = num_examples - num_val
    if num_val == 0 or num_train == 0:
        raise UserError(
            f"{what} has {num_examples} usable examples: --val_fraction={val_fraction} "
            f"leaves {num_train} for training and {num_val} for validation. "
            "Add images or change --val_fraction."
        )
    return num_train, num_val


def check_image_file(path: str) -> str | None:
    """Returns why TensorFlow could not use the image file, or None if it can.

    Reads only the header (and the last bytes of a JPEG), so a decompression bomb
    or a truncated file is caught without decoding it.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as image:
            kind, (width, height) = image.format, image.size
    except Image.DecompressionBombError:
        return f"more than {MAX_IMAGE_PIXELS} pixels"
    except Exception as e:  # PIL raises many types for unreadable files
        return f"not an image ({type(e).__name__})"
    if kind not in DECODABLE_FORMATS:
        return f"{kind} format is not supported"
    if width * height > MAX_IMAGE_PIXELS:
        return f"{width}x{height} is more than {MAX_IMAGE_PIXELS} pixels"
    if kind in ("JPEG", "MPO"):
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 64))
            if b"\xff\xd9" not in f.read().rstrip(b"\x00\r\n "):
                return "truncated JPEG (no end marker)"
    return None


def list_image_folder(image_dir: str) -> tuple[list[str], list[int], list[str]]:
    """Lists usable images under one sub-folder per class, sorted.

    Returns:
      (paths, labels, class_names). Hidden files, other extensions and files
      that fail `check_image_file` are left out; the latter with a count in the log.
    """
    if not os.path.isdir(image_dir):
        raise UserError(f"--image_dir={image_dir} is not a directory.")
    class_names, paths, labels, skipped = [], [], [], []
    for name in sorted(os.listdir(image_dir)):
        class_dir = os.path.join(image_dir, name)
        if name.startswith(".") or not os.path.isdir(class_dir):
            continue
        files = [
            os.path.join(class_dir, f)
            for f in sorted(os.listdir(class_dir))
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
        good = []
        for path in files:
            reason = check_image_file(path)
            (skipped.append((path, reason)) if reason else good.append(path))
        if not good:
            logging.warning("Class folder %s has no usable images; it is left out.", class_dir)
            continue
        paths += good
        labels += [len(class_names)] * len(good)
        class_names.append(name)
    if skipped:
        logging.warning(
            "Skipped %d of %d image files that cannot be read; first ones: %s",
            len(skipped), len(skipped) + len(paths),
            "; ".join(f"{p} ({r})" for p, r in skipped[:5]),
        )
    if len(class_names) < 2:
        raise UserError(
            f"--image_dir={image_dir} must hold at least 2 class sub-folders with images "
            f"({IMAGE_EXTENSIONS}); found {len(class_names)}: {class_names}."
        )
    return paths, labels, class_names


def _image_folder_source(config: DataConfig, seed: int) -> DataSource:
    paths, labels, class_names = list_image_folder(config.image_dir)
    num_train, num_val = split_sizes(len(paths), config.val_fraction, f"--image_dir={config.image_dir}")
    order = np.random.default_rng(seed).permutation(len(paths))
    paths_arr, labels_arr = np.array(paths)[order], np.array(labels, np.int64)[order]

    def examples(start: int, stop: int) -> Callable[[], tf.data.Dataset]:
        def make() -> tf.data.Dataset:
            files = tf.data.Dataset.from_tensor_slices((paths_arr[start:stop], labels_arr[start:stop]))
            return files.map(lambda path, label: (tf.io.read_file(path), label),
                             num_parallel_calls=AUTOTUNE)
        return make

    return DataSource(
        config=config, seed=seed, class_names=tuple(class_names),
        sizes={"train": num_train, "val": num_val},
        examples={"train": examples(0, num_train), "val": examples(num_train, len(paths))},
        encoded=True, identity=os.path.abspath(config.image_dir),
    )


def synthetic_images(num_examples: int, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Procedural, learnable images: the class sets the stripes' angle and tint.

    Returns:
      (uint8 images [n, size, size, 3], int64 labels [n]); phase, frequency and
      noise vary per image, so a model must learn orientation, not memorise pixels.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, SYNTHETIC_CLASSES, num_examples)
    angle = labels * np.pi / SYNTHETIC_CLASSES + rng.normal(0.0, 0.08, num_examples)
    frequency = rng.uniform(2.0, 4.0, num_examples)  # stripes per image
    phase = rng.uniform(0.0, 2 * np.pi, num_examples)
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
    along = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy
    wave = np.sin(2 * np.pi * frequency[:, None, None] * along + phase[:, None, None])
    tint = np.array([[1.0, 0.4, 0.4], [0.4, 1.0, 0.4], [0.4, 0.4, 1.0],
                     [1.0, 1.0, 0.3], [0.3, 1.0, 1.0]])[labels % 5]
    images = 128 + 90 * wave[..., None] * tint[:, None, None, :]
    images += rng.normal(0.0, 20.0, images.shape)
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def _synthetic_source(config: DataConfig, seed: int) -> DataSource:
    images, labels = synthetic_images(config.synthetic_examples,
                                      config.image_size or SYNTHETIC_IMAGE_SIZE, seed)
    num_train, _ = split_sizes(len(labels), config.val_fraction, "--dataset=synthetic")

    def examples(part: slice) -> Callable[[], tf.data.Dataset]:
        return lambda: tf.data.Dataset.from_tensor_slices((images[part], labels[part]))

    angles = [round(180 * k / SYNTHETIC_CLASSES) for k in range(SYNTHETIC_CLASSES)]
    return DataSource(
        config=config, seed=seed, class_names=tuple(f"stripes_{a}deg" for a in angles),
        sizes={"train": num_train, "val": len(labels) - num_train},
        examples={"train": examples(slice(0, num_train)), "val": examples(slice(num_train, None))},
        encoded=False, identity=f"synthetic-{config.synthetic_examples}",
    )


def _tfds_source(config: DataConfig, seed: int) -> DataSource:
    import tensorflow_datasets as tfds  # slow to import; only TFDS runs pay for it

    name = config.dataset
    way_out = ("Offline, prepare it on a connected machine and pass --data_dir, or pass an "
               "image folder (for tf_flowers: the extracted flower_photos) with --image_dir.")
    try:
        builder = tfds.builder(name, data_dir=config.data_dir)
    except Exception as e:
        raise UserError(
            f"--dataset={name} is not a TFDS dataset ({e.__class__.__name__}); use synthetic, "
            "tf_flowers or another TFDS image-classification dataset, or --image_dir."
        ) from None
    if not builder.is_prepared():
        if config.data_dir:
            raise UserError(
                f"--dataset={name} is not prepared in --data_dir={config.data_dir}. {way_out}")
        if not host_resolves(builder.info.homepage):
            raise UserError(
                f"--dataset={name} is not prepared and this machine looks offline (cannot "
                f"resolve {urllib.parse.urlparse(builder.info.homepage).hostname}). {way_out}")
        logging.info("Downloading and preparing %s ...", name)
        try:
            builder.download_and_prepare()
        except Exception as e:
            raise UserError(
                f"--dataset={name} could not be downloaded ({str(e).splitlines()[0][:200]}). "
                f"{way_out}") from None
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise UserError(f"--dataset={name} has no 'image' and 'label' features; "
                        "it is not an image-classification dataset.")
    def all_examples() -> tf.data.Dataset:
        # Decoding is ours (after sharding, before the cache), as for folders.
        ds = builder.as_dataset(split="train", shuffle_files=False,
                                decoders={"image": tfds.decode.SkipDecoding()})
        return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int64)))

    splits = builder.info.splits
    if "train" in splits:
        num_examples = splits["train"].num_examples
    else:  # split sizes unrecorded (as under tfds.testing.mock_data): count
        num_examples = int(all_examples().reduce(0, lambda count, _: count + 1))
    num_train, _ = split_sizes(num_examples, config.val_fraction, f"--dataset={name}")

    return DataSource(
        config=config, seed=seed, class_names=tuple(features["label"].names),
        sizes={"train": num_train, "val": num_examples - num_train},
        # The reference's train[:70%] / train[70%:], in the dataset's stored order.
        examples={"train": lambda: all_examples().take(num_train),
                  "val": lambda: all_examples().skip(num_train)},
        encoded=True, identity=f"tfds-{name}-{os.path.abspath(builder.data_dir)}",
    )


def host_resolves(url: str, timeout_sec: float = 5.0) -> bool:
    """Whether the host of `url` resolves within `timeout_sec`: a quick offline check,
    since TFDS's download retries take minutes to give up."""
    host = urllib.parse.urlparse(url or "").hostname
    if not host:
        return True
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(socket.getaddrinfo, host, 443).result(timeout=timeout_sec)
        return True
    except Exception:  # resolution failed or timed out
        return False
    finally:
        pool.shutdown(wait=False)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full training batches per epoch (the last partial batch is dropped)."""
    if num_examples < global_batch_size:
        raise UserError(
            f"--batch_size={global_batch_size} is larger than the {num_examples} training "
            "examples; lower --batch_size."
        )
    return num_examples // global_batch_size

