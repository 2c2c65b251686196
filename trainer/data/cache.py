"""Where decoded images are kept: the plan (memory, files or none), file caches and the cache stage.

Images are cached as uint8 after decoding and before shuffling and augmenting,
so a cache holds a quarter of what float32 images would take and random parts
vary per epoch. `plan_cache` puts them in memory when they fit, else in files
published by rename (FileCache), else nowhere; a file cache's entry is named by
split, shard and a fingerprint of the examples and settings, so other data or
settings never read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
from typing import Any, Callable

import numpy as np
import psutil
import tensorflow as tf
from absl import logging

from trainer import files
from trainer.config import DataConfig, UserError

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
# DataConfig fields that cannot change what a cache holds (the random parts come
# after it; the sizes the images are stored at are in the fingerprint themselves);
# all others are in its fingerprint, so a new setting invalidates caches unless
# listed here. So runs that read the same images at the same size (a sweep of
# presets over one dataset) share one cache.
NOT_IN_CACHE_FINGERPRINT = ("cache", "global_batch_size", "augment", "mixup_alpha",
                            "image_size", "resize_size")
CGROUP_ROOT = "/sys/fs/cgroup"  # where a container's memory limit is read


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """Where a source's decoded images are cached, and why (with the figures, for the log)."""

    mode: str  # "memory", "file" or "none"
    directory: str | None = None  # of the file cache
    prune: bool = False  # the directory is the workdir's own: remove entries of other data
    reason: str = ""


def cache_examples(ds: tf.data.Dataset, plan: CachePlan, split: str, source_fingerprint: str,
                   shard: int = 0, num_shards: int = 1) -> tf.data.Dataset:
    """The cache stage: `ds` (decoded examples) kept where `plan` says.

    Args:
      ds: one input pipeline's decoded examples of `split`.
      plan: where to keep them (see plan_cache).
      split: "train" or "val".
      source_fingerprint: names the file cache's entries (DataSource.fingerprint).
      shard, num_shards: the training shard `ds` holds; each has its own entry.
    """
    if plan.mode == "memory":
        return ds.cache()
    if plan.mode == "file":
        slot = f"{shard}of{num_shards}-" if split == "train" else ""
        # The entries this data may use (any training shard: other workers').
        keep = re.compile(rf"(train-\d+of\d+|val)-{source_fingerprint}") if plan.prune else None
        return FileCache(plan.directory, f"{split}-{slot}{source_fingerprint}", keep).cached(ds)
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


class FileCache:
    """One split's decoded images in files, written under a temporary name and published by rename.

    A pass that finds the entry `directory/name` reads it. Otherwise it has
    TensorFlow write the cache into a new staged directory (files.StagedDirectory)
    and renames it to `name` once the last element is written. So no reader ever
    opens a half-written cache, runs that write at the same time each write their
    own (the first rename wins), and a killed writer's temporary, TensorFlow's
    lockfile included, is removed by the next FileCache on the directory: its
    flock died with it (see trainer/files.py).
    """

    def __init__(self, directory: str, name: str, keep: re.Pattern | None = None):
        """Removes dead writers' temporaries and, when `keep` is given (the
        directory is the workdir's own), published entries it does not match."""
        self.directory, self.entry = directory, os.path.join(directory, name)
        self._staged: dict[str, files.StagedDirectory] = {}  # by path: this process's writes
        os.makedirs(directory, exist_ok=True)
        with files.directory_lock(directory):
            files.remove_stale_temporaries(directory)
            for other in os.listdir(directory):
                path = os.path.join(directory, other)
                if (keep is not None and os.path.isdir(path)
                        and not files.TEMPORARY.fullmatch(other) and not keep.fullmatch(other)):
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
        with files.directory_lock(self.directory):
            if os.path.exists(os.path.join(self.entry, CACHE_PREFIX + ".index")):
                return os.path.join(self.entry, CACHE_PREFIX).encode()
            staged = files.StagedDirectory(self.entry)
        self._staged[staged.path] = staged
        logging.info("Writing the cache %s (published when complete).", self.entry)
        return os.path.join(staged.path, CACHE_PREFIX).encode()

    def _publish(self, prefix: bytes) -> None:
        staged = self._staged.pop(os.path.dirname(prefix.decode()), None)
        if staged is not None:  # else the pass read the published entry
            # Another run may have published it first: the same images.
            staged.publish(replace=False)


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


def stored_size(config: DataConfig, split: str) -> int:
    """Pixels (square) a split's images are decoded and cached at."""
    # Random resized crops keep the training images larger until the crop.
    if split == "train" and config.augment == "resize_crop":
        return config.resize_size
    return config.image_size


def fingerprint(config: DataConfig, seed: int, examples: Any) -> str:
    """A short hash of the examples (JSON-able: file names, sizes, mtimes...) and of
    every setting that changes the cached images: equal for runs that read the same
    images at the same sizes, whatever they do after the cache."""
    settings = {k: v for k, v in dataclasses.asdict(config).items()
                if k not in NOT_IN_CACHE_FINGERPRINT}
    sizes = {split: stored_size(config, split) for split in ("train", "val")}
    key = json.dumps([CACHE_FORMAT, settings, sizes, seed, examples], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]
