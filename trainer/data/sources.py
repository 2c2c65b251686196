"""What a dataset is and where it comes from: image folders, TFDS or synthetic images.

A DataSource splits its examples into train and validation once (seeded) and
makes each split's unbatched (image, label) examples on demand: encoded bytes
for folders and TFDS (decoded later, after sharding: see decode.py), uint8
images for synthetic data. It also says what the examples are (`contents`),
which names the file caches, and how to name an example in the log.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import socket
import urllib.parse
from typing import Any, Callable

import numpy as np
import tensorflow as tf
from absl import logging
from PIL import Image

from trainer import preflight
from trainer.config import DataConfig, UserError
from trainer.data import folders
from trainer.data.cache import CachePlan, fingerprint
from trainer.data.few_shot import few_shot

SYNTHETIC_CLASSES = 5
SYNTHETIC_IMAGE_SIZE = 224  # pixels: synthetic images when --image_size is left to a rule
SIZE_SAMPLE = 100  # training images whose headers give the dataset's typical size
TFDS_OFFLINE = ("Offline, prepare it on a connected machine and pass --data_dir, or pass an "
                "image folder (for tf_flowers: the extracted flower_photos) with --image_dir.")


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A dataset split into train and validation, ready to become pipelines (pipeline.py).

    `examples[split]` makes the split's unbatched (image, label) dataset: encoded
    image bytes when `encoded`, else uint8 images already at their size.
    """

    config: DataConfig
    seed: int
    class_names: tuple[str, ...]
    sizes: dict[str, int]  # examples per split: "train", "val"
    examples: dict[str, Callable[[], tf.data.Dataset]]
    encoded: bool
    # What the examples are (files, sizes, mtimes; JSON-able): with the settings
    # that change cached images, it names file caches (see `fingerprint`).
    contents: Any
    # Name of the split's i-th example (a file path, or its index), for the log.
    example_names: dict[str, Callable[[int], str]]
    # Where the pipeline keeps the decoded images: decided by pipeline.choose_cache.
    cache: CachePlan = CachePlan("memory")
    # Image folders: the split's examples at some positions (a subset, in the split's
    # order), and the (height, width) of each example's JPEG header, (0, 0) for other
    # formats, as the listing read them: the decode stage takes each JPEG's DCT scale
    # from them (decode.decode_at_known_scales). None where unknown (TFDS, synthetic).
    examples_at: dict[str, Callable[[np.ndarray | slice], tf.data.Dataset]] | None = None
    jpeg_shapes: dict[str, np.ndarray] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def fingerprint(self) -> str:
        """A short hash of the examples and of every setting that changes the cached images."""
        return fingerprint(self.config, self.seed, self.contents)

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


def needs(config: DataConfig) -> list[preflight.Need]:
    """What the data needs before a run starts (see trainer/preflight.py): the folder of
    --image_dir; the TFDS dataset prepared in --data_dir, or its download when it is
    prepared nowhere. Reads directory listings only; fetches nothing."""
    if config.image_dir:
        problem = folders.image_folder_problem(config.image_dir)
        return [preflight.LocalProblem("--image_dir", problem)] if problem else []
    if config.dataset == "synthetic":
        return []
    if config.data_dir and "://" in config.data_dir:  # read where it is: its host is checked
        return [preflight.Remote("--data_dir", f"--dataset={config.dataset}", config.data_dir,
                                 TFDS_OFFLINE)]
    if config.data_dir and not os.path.isdir(config.data_dir):
        return [preflight.LocalProblem("--data_dir", f"--data_dir={config.data_dir} is not a "
                                       f"directory. {TFDS_OFFLINE}")]
    try:
        builder = tfds_builder(config)
    except UserError as e:
        return [preflight.LocalProblem("--dataset", str(e))]
    return [] if builder.is_prepared() else _unprepared_needs(config, builder)


def create_data_source(config: DataConfig, seed: int) -> DataSource:
    """Resolves the data the config names: an image folder, synthetic, or TFDS.

    Its cache is decided by `pipeline.choose_cache` (memory until then), once
    the sizes the images are stored at are known.

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


def _image_folder_source(config: DataConfig, seed: int) -> DataSource:
    folder = folders.scan_image_folder(config.image_dir)
    paths, labels, class_names = folder.paths, folder.labels, folder.class_names
    num_train, num_val = split_sizes(len(paths), config.val_fraction, f"--image_dir={config.image_dir}")
    order = np.random.default_rng(seed).permutation(len(paths))
    paths_arr, labels_arr = np.array(paths)[order], np.array(labels, np.int64)[order]
    shapes_arr = folder.jpeg_shapes[order]
    # Positions in the shuffled listing of each split's examples (few-shot: a subset).
    chosen = {"train": few_shot(labels_arr[:num_train], config.examples_per_class, seed,
                                class_names),
              "val": np.arange(num_train, len(paths))}

    def examples_at(indices: np.ndarray) -> Callable[[np.ndarray | slice], tf.data.Dataset]:
        def make(positions: np.ndarray | slice) -> tf.data.Dataset:
            files = tf.data.Dataset.from_tensor_slices((paths_arr[indices][positions],
                                                        labels_arr[indices][positions]))
            return files.map(lambda path, label: (tf.io.read_file(path), label),
                             num_parallel_calls=tf.data.AUTOTUNE)
        return make

    def files(path: str, label: int) -> list[Any]:
        stat = os.stat(path)
        return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns, label]

    return DataSource(
        config=config, seed=seed, class_names=tuple(class_names),
        sizes={split: len(indices) for split, indices in chosen.items()},
        examples={split: lambda make=examples_at(indices): make(slice(None))
                  for split, indices in chosen.items()},
        encoded=True,
        contents=[class_names, *map(files, paths, labels)],
        example_names={split: lambda k, indices=indices: str(paths_arr[indices[k]])
                       for split, indices in chosen.items()},
        examples_at={split: examples_at(indices) for split, indices in chosen.items()},
        jpeg_shapes={split: shapes_arr[indices] for split, indices in chosen.items()},
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
    angles = [round(180 * k / SYNTHETIC_CLASSES) for k in range(SYNTHETIC_CLASSES)]
    class_names = tuple(f"stripes_{a}deg" for a in angles)
    train = few_shot(labels[:num_train], config.examples_per_class, seed, class_names)

    def examples(part: np.ndarray | slice) -> Callable[[], tf.data.Dataset]:
        return lambda: tf.data.Dataset.from_tensor_slices((images[part], labels[part]))

    return DataSource(
        config=config, seed=seed, class_names=class_names,
        sizes={"train": len(train), "val": len(labels) - num_train},
        examples={"train": examples(train), "val": examples(slice(num_train, None))},
        encoded=False, contents="synthetic",
        example_names={split: lambda k, split=split: f"synthetic {split} example {k}"
                       for split in ("train", "val")},
    )


def tfds_builder(config: DataConfig) -> Any:
    """The TFDS builder of --dataset in --data_dir (nothing is read or downloaded).

    Raises:
      UserError: --dataset is not a TFDS dataset.
    """
    import tensorflow_datasets as tfds  # slow to import; only TFDS runs pay for it

    try:
        return tfds.builder(config.dataset, data_dir=config.data_dir)
    except Exception as e:
        raise UserError(
            f"--dataset={config.dataset} is not a TFDS dataset ({e.__class__.__name__}); use "
            "synthetic, tf_flowers or another TFDS image-classification dataset, or --image_dir."
        ) from None


def _unprepared_needs(config: DataConfig, builder: Any) -> list[preflight.Need]:
    """A dataset not prepared: a problem of --data_dir when given, else its download."""
    name = config.dataset
    if config.data_dir:
        return [preflight.LocalProblem("--data_dir", f"--dataset={name} is not prepared in "
                                       f"--data_dir={config.data_dir}. {TFDS_OFFLINE}")]
    # The files it is made from (checksums.tsv), else its home page: the host to check.
    url = next(iter(builder.url_infos or {}), builder.info.homepage)
    return [preflight.Remote("--data_dir", f"the {name} dataset (not prepared in the default "
                             "TFDS data directory)", url, TFDS_OFFLINE)]


def _tfds_source(config: DataConfig, seed: int) -> DataSource:
    import tensorflow_datasets as tfds  # slow to import; only TFDS runs pay for it

    name = config.dataset
    builder = tfds_builder(config)
    if not builder.is_prepared():
        preflight.require(_unprepared_needs(config, builder))
        logging.info("Downloading and preparing %s ...", name)
        try:
            builder.download_and_prepare()
        except Exception as e:
            raise UserError(
                f"--dataset={name} could not be downloaded ({str(e).splitlines()[0][:200]}). "
                f"{TFDS_OFFLINE}") from None
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
    class_names = tuple(features["label"].names)
    train = np.arange(num_train)
    if config.examples_per_class:  # the labels of the training split, read once
        labels = np.fromiter(all_examples().take(num_train).map(lambda _, label: label)
                             .as_numpy_iterator(), np.int64, num_train)
        train = few_shot(labels, config.examples_per_class, seed, class_names)

    def train_examples() -> tf.data.Dataset:
        if len(train) == num_train:
            return all_examples().take(num_train)
        kept = tf.constant(np.isin(np.arange(num_train), train))
        return (all_examples().take(num_train).enumerate()
                .filter(lambda i, _: kept[i]).map(lambda _, example: example))

    return DataSource(
        config=config, seed=seed, class_names=class_names,
        sizes={"train": len(train), "val": num_examples - num_train},
        # The reference's train[:70%] / train[70%:], in the dataset's stored order.
        examples={"train": train_examples, "val": lambda: all_examples().skip(num_train)},
        encoded=True,
        contents=[name, os.path.abspath(builder.data_dir), num_examples,
                  data_files(builder.data_dir)],
        example_names={"train": lambda k: f"{name} train[{train[k]}]",
                       "val": lambda k: f"{name} train[{num_train + k}]"},
    )


def data_files(directory: str) -> list[list[Any]]:
    """Names, sizes and mtimes of the files in a directory, sorted (a TFDS dataset's
    records; local or on a cloud file system). Empty when there is no directory."""
    if not tf.io.gfile.isdir(directory):
        return []
    files = []
    for name in sorted(tf.io.gfile.listdir(directory)):
        path = os.path.join(directory, name)
        if not tf.io.gfile.isdir(path):
            stat = tf.io.gfile.stat(path)
            files.append([name, stat.length, stat.mtime_nsec])
    return files


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
