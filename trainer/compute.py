"""How a run computes on this hardware: precision, XLA, steps per execution, micro-batches.

`choose_compute` asks the backbone's spec what it is (a TF Hub SavedModel keeps its
float32 and cannot be compiled with XLA when trainable), `distribute` what the hardware
gains from, and `steps` how the batch is split; every choice keeps its reason, for the
log, summary.json, the HParams and compare's report.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf

from trainer import backbones, distribute
from trainer import steps as steps_lib
from trainer.config import Config


@dataclasses.dataclass(frozen=True)
class Compute:
    """How the model computes on this hardware, each choice with its reason."""

    precision: str  # Keras mixed-precision policy
    precision_reason: str
    backbone_follows_policy: bool  # False: a TF Hub SavedModel keeps its float32
    jit_compile: bool  # XLA
    jit_compile_reason: str
    steps_per_execution: int  # training steps per compiled call
    steps_per_execution_reason: str
    accumulation_steps: int = 1  # micro-batches per replica and optimizer step
    accumulation_reason: str = steps_lib.WHOLE_BATCH

    @property
    def computes_in(self) -> dict[str, Any]:
        """What backbone and head compute in, and loss scaling: the words of the log,
        summary.json, the HParams and compare's report."""
        return distribute.describe_precision(self.precision, self.backbone_follows_policy)


def choose_compute(config: Config, strategy: tf.distribute.Strategy,
                   steps_per_epoch: int) -> Compute:
    """Resolves precision, XLA and steps per execution (`auto` and unset: by hardware)."""
    # TF Hub SavedModels keep their saved dtypes: no mixed policy reaches inside.
    saved_model = backbones.spec(config.model.backbone).saved_model
    precision, precision_reason = distribute.choose_precision(
        config.train, strategy, backbone_follows_policy=not saved_model)
    jit_compile, jit_compile_reason = distribute.choose_jit_compile(
        config.train, strategy, trainable_saved_model=saved_model and config.model.trainable)
    steps, steps_reason = distribute.choose_steps_per_execution(config.train, strategy,
                                                                steps_per_epoch)
    accumulation, accumulation_reason = steps_lib.choose_accumulation(
        config.train, distribute.per_replica_batch_size(config.data.global_batch_size, strategy))
    return Compute(precision, precision_reason, not saved_model, jit_compile,
                   jit_compile_reason, steps, steps_reason, accumulation, accumulation_reason)
