"""Backbones, one module each: the network and the preprocessing its weights expect.

Every module has `build(config, image_size) -> Backbone`; the registry and the
classification head live in `trainer.models`. A backbone may also have
`check_source(config)`, which fails fast on weights or a handle it cannot use,
before any data is read.
"""

from __future__ import annotations

import dataclasses

import tf_keras as keras


@dataclasses.dataclass(frozen=True)
class Backbone:
    preprocess: keras.layers.Layer  # uint8 images -> what `network` expects (float32)
    network: keras.layers.Layer  # images -> [batch, features]
    has_batch_norm: bool  # BN statistics can be frozen with training=False
    mixed_precision: bool  # runs in the global policy (False: kept float32)
