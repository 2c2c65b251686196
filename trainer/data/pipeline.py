"""One input pipeline: shard, decode, cache, shuffle, augment, batch, [MixUp], prefetch.

Images stay uint8 up to the model (which normalises them). The cache is chosen
once per source (`choose_cache`), when the sizes the images are stored at are
known and before anything is decoded; `create_dataset` builds the pipeline of
one worker for one split.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from absl import logging

from trainer.config import UserError
from trainer.data import augment, cache, decode
from trainer.data.sources import DataSource

SHUFFLE_BUFFER = 2048  # images; splits are already randomly ordered once


def choose_cache(source: DataSource, cache_dir: str | None = None,
                 input_pipelines: int = 1) -> DataSource:
    """Returns `source` with its cache decided (see cache.plan_cache), before any decoding.

    Args:
      source: the data, its config final (image sizes known).
      cache_dir: the run's directory for file caches (cache.WORKDIR_CACHE under the
        workdir); None: no file cache unless --cache names a directory.
      input_pipelines: workers reading the data, each caching its training
        shard and the whole validation split.

    Raises:
      UserError: the cache asked for cannot hold the images; names --cache.
    """
    stored_sizes = {split: cache.stored_size(source.config, split) for split in source.sizes}
    plan = cache.plan_cache(
        source.config.cache, cache.cache_bytes(source.sizes, stored_sizes, input_pipelines),
        cache_dir)
    logging.info("Cache: %s%s (%s).", plan.mode,
                 f" in {plan.directory}" if plan.directory else "", plan.reason)
    return dataclasses.replace(source, cache=plan)


def create_dataset(
    source: DataSource,
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
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    if not training or num_pipelines == 1:
        shard, num_shards = 0, 1
    else:
        shard, num_shards = pipeline_id, num_pipelines
    positions = np.arange(shard, source.sizes[split], num_shards)  # this pipeline's examples
    names = source.example_names[split]
    skips = decode.DecodeSkips(lambda k: names(positions[k]), len(positions))
    size = cache.stored_size(source.config, split)
    if source.examples_at is not None:
        ds = decode.decode_at_known_scales(source.examples_at[split], positions,
                                           source.jpeg_shapes[split], size, skips)
    else:
        ds = source.examples[split]()
        if num_shards > 1:
            ds = ds.shard(num_shards, shard)
        ds = decode.decode_examples(ds, size, source.encoded, skips)
    ds = cache.cache_examples(ds, source.cache, split, source.fingerprint, shard, num_shards)
    if training:
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=source.seed, reshuffle_each_iteration=True)
        ds = ds.repeat()
        ds = augment.augment_examples(ds, source.config.augment, source.config.image_size)
    ds = ds.batch(per_replica_batch_size, drop_remainder=training)
    ds = augment.mixup_batches(ds, source.config.mixup_alpha, source.num_classes, training)
    return ds.prefetch(tf.data.AUTOTUNE)


def preview(source: DataSource, count: int) -> tf.Tensor:
    """Returns up to `count` training images as the model sees them (uint8)."""
    # The training pass names undecodable files: no DecodeSkips here.
    ds = decode.decode_examples(source.examples["train"]().take(count),
                                cache.stored_size(source.config, "train"), source.encoded)
    ds = augment.augment_examples(ds, source.config.augment, source.config.image_size)
    ds = augment.mixup_batches(ds.batch(count), source.config.mixup_alpha, source.num_classes,
                               training=True)
    return next(iter(ds))[0]


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full training batches per epoch (the last partial batch is dropped)."""
    if num_examples < global_batch_size:
        raise UserError(
            f"--batch_size={global_batch_size} is larger than the {num_examples} training "
            "examples; lower --batch_size."
        )
    return num_examples // global_batch_size
