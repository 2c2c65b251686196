"""Input data: TFDS, image folders and synthetic images as tf.data pipelines, with their caches.

Each split runs decode -> resize -> uint8 -> cache -> shuffle -> augment ->
batch -> [MixUp] -> prefetch. JPEGs are decoded at the smallest DCT scale that still
covers the input size. Images stay uint8 up to the model (which normalises
them), so a cache holds a quarter of what float32 images would take. The cache
is in memory when the decoded images fit, else in files published by rename
(see FileCache), else there is none (see plan_cache); `DataSource.with_cache`
decides, once the sizes the images are stored at are known.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import urllib.parse
from typing import Any, Callable, Iterator

import numpy as np
import psutil
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
JPEG_RATIOS = (1, 2, 4, 8)  # DCT scales libjpeg decodes at: 1/ratio of each side
# Share of the memory available at start (per worker) that --cache=auto lets the
# decoded images take; the rest is for the model, TensorFlow and tf.data's buffers.
MEMORY_CACHE_SHARE = 0.5
DISK_CACHE_SHARE = 0.5  # share of the free disk space a file cache may take
LABEL_BYTES = 8  # per cached example: its int64 label
# Part of every cache's fingerprint: bump it when decoding changes the cached
# pixels (2: JPEGs decoded to size), so no run reads images made the old way.
CACHE_FORMAT = 2
WORKDIR_CACHE = "cache"  # sub-directory of the workdir for file caches
CACHE_PREFIX = "cache"  # of TensorFlow's files in a cache entry: cache.index, cache.data-*
# DataConfig fields that cannot change what a cache holds; all others are in
# its fingerprint, so a new setting invalidates caches unless listed here.
NOT_IN_CACHE_FINGERPRINT = ("cache", "global_batch_size")
LOGGED_NAMES = 5  # file names shown in a log line about skipped files
CGROUP_ROOT = "/sys/fs/cgroup"  # where a container's memory limit is read


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, "PNG")
    return out.getvalue()


SENTINEL_PNG = _png(1, 1)  # decodes always: marks the end of a stream (see DecodeSkips)


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """Where a source's decoded images are cached, and why (with the figures, for the log)."""

    mode: str  # "memory", "file" or "none"
    directory: str | None = None  # of the file cache
    prune: bool = False  # the directory is the workdir's own: remove entries of other data
    reason: str = ""


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
    # What the examples are (files, sizes, mtimes; JSON-able): with the settings
    # that change cached images, it names file caches (see `fingerprint`).
    contents: Any
    # Name of the split's i-th example (a file path, or its index), for the log.
    example_names: dict[str, Callable[[int], str]]
    cache: CachePlan = CachePlan("memory")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def fingerprint(self) -> str:
        """A short hash of the examples and of every setting that changes the cached images."""
        return fingerprint(self.config, self.seed, self.contents)

    def with_cache(self, cache_dir: str | None = None, input_pipelines: int = 1) -> DataSource:
        """Returns this source with its cache decided (see plan_cache), before any decoding.

        Args:
          cache_dir: the run's directory for file caches (WORKDIR_CACHE under the
            workdir); None: no file cache unless --cache names a directory.
          input_pipelines: workers reading the data, each caching its training
            shard and the whole validation split.

        Raises:
          UserError: the cache asked for cannot hold the images; names --cache.
        """
        stored_sizes = {split: self._stored_size(split) for split in self.sizes}
        plan = plan_cache(self.config.cache, cache_bytes(self.sizes, stored_sizes, input_pipelines),
                          cache_dir)
        logging.info("Cache: %s%s (%s).", plan.mode,
                     f" in {plan.directory}" if plan.directory else "", plan.reason)
        return dataclasses.replace(self, cache=plan)

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
        if not training or num_pipelines == 1:
            shard, num_shards = 0, 1
        else:
            shard, num_shards = pipeline_id, num_pipelines
            ds = ds.shard(num_shards, shard)
        names = self.example_names[split]
        ds = self._decoded(ds, self._stored_size(split),
                           DecodeSkips(lambda k: names(shard + k * num_shards),
                                       len(range(shard, self.sizes[split], num_shards))))
        ds = self._cached(ds, split, shard, num_shards)
        if training:
            ds = ds.shuffle(SHUFFLE_BUFFER, seed=self.seed, reshuffle_each_iteration=True)
            ds = ds.repeat()
            ds = self._augmented(ds)
        ds = self._mixed(ds.batch(per_replica_batch_size, drop_remainder=training), training)
        return ds.prefetch(AUTOTUNE)

    def preview(self, count: int) -> tf.Tensor:
        """Returns up to `count` training images as the model sees them (uint8)."""
        # The training pass names undecodable files: no DecodeSkips here.
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
        """Pixels (square) a split's images are decoded and cached at."""
        # Random resized crops keep the training images larger until the crop.
        if split == "train" and self.config.augment == "resize_crop":
            return self.config.resize_size
        return self.config.image_size

    def _decoded(self, ds: tf.data.Dataset, size: int,
                 skips: DecodeSkips | None = None) -> tf.data.Dataset:
        """Decodes a stream of encoded examples to `size`; those TensorFlow cannot decode
        are dropped and, with `skips`, named in the log once the stream has been read to
        its end. Synthetic (decoded) images are only resized when their size differs."""
        if not self.encoded:
            if tuple(ds.element_spec[0].shape[:2]) == (size, size):
                return ds
            return ds.map(lambda image, label: (resize(image, size), label),
                          num_parallel_calls=AUTOTUNE)
        # The header checks of list_image_folder keep decompression bombs and
        # non-images out; TensorFlow's decoder judges the rest (phone photos with
        # data after the JPEG, cut files). Its error is logged per file.
        if skips is None:
            return ds.map(lambda data, label: (decode_image(data, size), label),
                          num_parallel_calls=AUTOTUNE).ignore_errors(log_warning=True)
        ds = skips.numbered(ds).map(
            lambda number, example: (number, decode_image(example[0], size), example[1]),
            num_parallel_calls=AUTOTUNE)
        return skips.watched(ds.ignore_errors(log_warning=True))

    def _cached(self, ds: tf.data.Dataset, split: str, shard: int,
                num_shards: int) -> tf.data.Dataset:
        if self.cache.mode == "memory":
            return ds.cache()
        if self.cache.mode == "file":
            slot = f"{shard}of{num_shards}-" if split == "train" else ""
            cache = FileCache(self.cache.directory, f"{split}-{slot}{self.fingerprint}",
                              self._cache_entries() if self.cache.prune else None)
            return cache.cached(ds)
        return ds

    def _cache_entries(self) -> re.Pattern:
        # The entries this data may use (any training shard: other workers').
        return re.compile(rf"(train-\d+of\d+|val)-{self.fingerprint}")

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


def run_at_end(ds: tf.data.Dataset, callback: Callable[..., Any],
               *args: tf.Tensor) -> tf.data.Dataset:
    """Returns `ds` followed by a call of `callback(*args)` (numpy values) each time an
    iterator over it reaches its end; nothing more is yielded."""
    def call(*values: np.ndarray) -> np.bool_:
        callback(*values)
        return np.bool_(False)

    done = tf.data.Dataset.range(1).map(
        lambda _: tf.numpy_function(call, list(args), tf.bool, stateful=True))
    # Never true, so flat_map never runs: an empty dataset typed as `ds`.
    return ds.concatenate(done.filter(lambda keep: keep).flat_map(lambda _: ds.take(0)))


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


class FileCache:
    """One split's decoded images in files, written under a temporary name and published by rename.

    A pass that finds the entry `directory/name` reads it. Otherwise it has
    TensorFlow write the cache into a new `name.tmp-XXXX` directory, holding an
    flock on its `.writer` file, and renames that directory to `name` once the
    last element is written. So no reader ever opens a half-written cache, runs
    that write at the same time each write their own (the first rename wins),
    and a killed writer's temporary, TensorFlow's lockfile included, is removed
    by the next FileCache on the directory: its flock died with it.
    """

    def __init__(self, directory: str, name: str, keep: re.Pattern | None = None):
        """Removes dead writers' temporaries and, when `keep` is given (the
        directory is the workdir's own), published entries it does not match."""
        self.directory, self.entry = directory, os.path.join(directory, name)
        self._writers: dict[str, Any] = {}  # temporary directory -> its open, locked .writer
        os.makedirs(directory, exist_ok=True)
        with directory_lock(directory):
            for other in os.listdir(directory):
                path = os.path.join(directory, other)
                if ".tmp-" in other and not writer_alive(path):
                    logging.info("Removing %s, a cache an interrupted run was writing.", path)
                    shutil.rmtree(path, ignore_errors=True)
                elif (keep is not None and os.path.isdir(path) and ".tmp-" not in other
                      and not keep.fullmatch(other)):
                    logging.info("Removing %s, the cache of other data or settings.", path)
                    shutil.rmtree(path, ignore_errors=True)

    def cached(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        """Returns `ds` read from this cache entry, written on the first pass that needs it."""
        def one_pass(_: tf.Tensor) -> tf.data.Dataset:
            prefix = tf.numpy_function(self._start_pass, [], tf.string, stateful=True)
            prefix = tf.ensure_shape(prefix, [])
            return run_at_end(ds.cache(prefix), self._publish, prefix)

        # flat_map runs one_pass per iterator: each pass decides to read or write.
        return tf.data.Dataset.range(1).flat_map(one_pass)

    def _start_pass(self) -> bytes:
        with directory_lock(self.directory):
            if os.path.exists(os.path.join(self.entry, CACHE_PREFIX + ".index")):
                return os.path.join(self.entry, CACHE_PREFIX).encode()
            temporary = tempfile.mkdtemp(prefix=os.path.basename(self.entry) + ".tmp-",
                                         dir=self.directory)
            writer = open(os.path.join(temporary, ".writer"), "w")
            fcntl.flock(writer, fcntl.LOCK_EX | fcntl.LOCK_NB)
        writer.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        writer.flush()
        self._writers[temporary] = writer
        logging.info("Writing the cache %s (published when complete).", self.entry)
        return os.path.join(temporary, CACHE_PREFIX).encode()

    def _publish(self, prefix: bytes) -> None:
        temporary = os.path.dirname(prefix.decode())
        writer = self._writers.pop(temporary, None)
        if writer is None:  # the pass read the published entry
            return
        try:
            os.rename(temporary, self.entry)
        except OSError:  # another run published it first: the same images
            shutil.rmtree(temporary, ignore_errors=True)
        writer.close()


@contextlib.contextmanager
def directory_lock(directory: str) -> Iterator[None]:
    """Holds an flock on `directory/.lock` (blocking): one process at a time creates
    or removes cache temporaries there."""
    with open(os.path.join(directory, ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def writer_alive(temporary: str) -> bool:
    """Whether a live process holds the flock of a cache temporary's `.writer`.

    Call under directory_lock: a writer creates and locks it there, so a
    temporary without a locked `.writer` has no live writer.
    """
    try:
        with open(os.path.join(temporary, ".writer"), "a") as writer:
            fcntl.flock(writer, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # gone, or not a directory: nothing writes it
        pass
    return False


def cache_bytes(sizes: dict[str, int], stored_sizes: dict[str, int], input_pipelines: int) -> int:
    """Bytes the decoded images of one worker take: its share of the training
    split and the whole validation split, uint8 [size, size, 3] and a label each.

    Args:
      sizes: examples per split ("train", "val").
      stored_sizes: pixels (square) each split's images are cached at.
      input_pipelines: workers sharing the training split.
    """
    examples = {"train": math.ceil(sizes["train"] / input_pipelines), "val": sizes["val"]}
    return sum(examples[split] * (stored_sizes[split] ** 2 * 3 + LABEL_BYTES)
               for split in examples)


def available_memory_bytes() -> int:
    """Memory this process may still use: psutil's available memory, capped by the
    container's cgroup limit (psutil sees the host's, not a pod's)."""
    available = psutil.virtual_memory().available
    for limit_file, usage_file, stat_file, inactive in (
            ("memory.max", "memory.current", "memory.stat", "inactive_file"),  # cgroup v2
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
             "memory/memory.stat", "total_inactive_file")):  # cgroup v1
        try:
            with open(os.path.join(CGROUP_ROOT, limit_file)) as f:
                limit = f.read().strip()
            with open(os.path.join(CGROUP_ROOT, usage_file)) as f:
                usage = int(f.read())
            with open(os.path.join(CGROUP_ROOT, stat_file)) as f:
                stats = dict(line.split() for line in f if len(line.split()) == 2)
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < available:  # "max" or a huge number: no limit
            # Page cache the kernel can drop counts as usage; it is not in the way.
            return max(0, min(available, int(limit) - usage + int(stats.get(inactive, 0))))
    return available


def plan_cache(setting: str, estimate_bytes: int, cache_dir: str | None) -> CachePlan:
    """Decides where the decoded images are cached.

    Args:
      setting: --cache: auto, memory, file, none, or a directory for a file cache.
      estimate_bytes: what the decoded images of this worker take (cache_bytes).
      cache_dir: the workdir's cache directory; None where there is no workdir.

    Returns:
      auto: memory when the images fit in MEMORY_CACHE_SHARE of the available
      memory, else a file cache in `cache_dir` when they fit in DISK_CACHE_SHARE
      of its free space, else none.

    Raises:
      UserError: an explicit memory or file cache that cannot hold the images;
        before anything is decoded.
    """
    memory_limit = MEMORY_CACHE_SHARE * available_memory_bytes()
    memory_figures = (f"the decoded images take {readable_bytes(estimate_bytes)}; "
                      f"{MEMORY_CACHE_SHARE:.0%} of the available memory is "
                      f"{readable_bytes(memory_limit)}")
    if setting == "none":
        return CachePlan("none", reason="--cache=none")
    if setting in ("auto", "memory") and estimate_bytes <= memory_limit:
        return CachePlan("memory", reason=f"--cache={setting}: {memory_figures}")
    if setting == "memory":
        raise UserError(
            f"--cache=memory: {memory_figures}, so they would not fit. Use --cache=file "
            "(decoded images on disk under the workdir), --cache=none (decode every epoch), "
            "or --cache=auto to choose by size.")
    directory, prune = (cache_dir, True) if setting in ("auto", "file") else (setting, False)
    if directory is None:
        if setting == "file":
            raise UserError("--cache=file needs a workdir to write to; pass a directory "
                            "with --cache=DIR.")
        return CachePlan("none", reason=f"--cache=auto: {memory_figures}; no file cache "
                         "without a workdir")
    disk_limit = DISK_CACHE_SHARE * shutil.disk_usage(existing_parent(directory)).free
    disk_figures = (f"{DISK_CACHE_SHARE:.0%} of the free disk space in {directory} is "
                    f"{readable_bytes(disk_limit)}")
    if estimate_bytes <= disk_limit:
        return CachePlan("file", directory, prune,
                         f"--cache={setting}: {memory_figures}; {disk_figures}")
    if setting == "auto":
        return CachePlan("none", reason=f"--cache=auto: {memory_figures}; {disk_figures}")
    raise UserError(f"--cache={setting}: the decoded images take {readable_bytes(estimate_bytes)} "
                    f"and {disk_figures}. Free disk space, pass another directory with "
                    "--cache=DIR, or use --cache=none (decode every epoch).")


def readable_bytes(count: float) -> str:
    """'0.0143 MB', '552 MB', '190.2 GB': three significant figures or more."""
    return f"{count / 1e9:,.1f} GB" if count >= 1e9 else f"{count / 1e6:.3g} MB"


def existing_parent(path: str) -> str:
    """`path` or its nearest existing ancestor (a cache directory is made on first use)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def fingerprint(config: DataConfig, seed: int, examples: Any) -> str:
    """A short hash of the examples (JSON-able: file names, sizes, mtimes...) and of
    every setting that changes the cached images."""
    settings = {k: v for k, v in dataclasses.asdict(config).items()
                if k not in NOT_IN_CACHE_FINGERPRINT}
    key = json.dumps([CACHE_FORMAT, settings, seed, examples], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


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

    Its cache is decided by `DataSource.with_cache` (memory until then), once
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


def check_image_file(path: str) -> str | None:
    """Returns why the file cannot be an image TensorFlow reads safely, or None.

    Reads only the header: empty files, non-images, formats TensorFlow does not
    decode and decompression bombs are caught without decoding anything.
    Whether the rest of the file decodes is TensorFlow's decoder's call (data
    after a JPEG's end, as phones append, is fine; see DataSource._decoded).
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

    def files(path: str, label: int) -> list[Any]:
        stat = os.stat(path)
        return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns, label]

    return DataSource(
        config=config, seed=seed, class_names=tuple(class_names),
        sizes={"train": num_train, "val": num_val},
        examples={"train": examples(0, num_train), "val": examples(num_train, len(paths))},
        encoded=True,
        contents=[class_names, *map(files, paths, labels)],
        example_names={"train": lambda k: str(paths_arr[k]),
                       "val": lambda k: str(paths_arr[num_train + k])},
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
        encoded=False, contents="synthetic",
        example_names={split: lambda k, split=split: f"synthetic {split} example {k}"
                       for split in ("train", "val")},
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
        encoded=True,
        contents=[name, os.path.abspath(builder.data_dir), num_examples,
                  data_files(builder.data_dir)],
        example_names={"train": lambda k: f"{name} train[{k}]",
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


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full training batches per epoch (the last partial batch is dropped)."""
    if num_examples < global_batch_size:
        raise UserError(
            f"--batch_size={global_batch_size} is larger than the {num_examples} training "
            "examples; lower --batch_size."
        )
    return num_examples // global_batch_size

