"""BiT-HyperRule: the learning-rate schedule, MixUp and resolution as pure functions of the data.

The rule of Big Transfer (Kolesnikov et al., arXiv 1912.11370, and the
authors' released code) for fine-tuning on a new dataset:

- SGD with momentum 0.9, no weight decay; peak rate 0.003 at a global batch of
  512, scaled linearly for other batches.
- The run is counted in optimizer steps. Five "supports" chosen by the
  training-set size: a linear warm-up from 0 to the first, the rate divided by
  10 after each of the next three, the end at the last.
- MixUp (alpha 0.1, one lambda per batch) from 20,000 training images up.
- Training images resized to 160 and randomly cropped to 128 when smaller
  than 96x96 in area, else resized to 512 and cropped to 480; evaluation
  resizes to the crop size.

Everything here is a plain function of numbers (step, training-set size,
global batch size, image size), tested on its own with numbers.
`HyperRuleSchedule` is the thin Keras wrapper the optimizer calls each step.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import tensorflow as tf
import tf_keras as keras

BASE_LEARNING_RATE = 0.003  # the rule's rate at BASE_BATCH_SIZE
BASE_BATCH_SIZE = 512  # images per step the authors fine-tuned with
DECAY_FACTOR = 10.0  # the rate is divided by this at each of the middle supports
MIXUP_MIN_EXAMPLES = 20_000  # training images from which MixUp is on
MIXUP_ALPHA = 0.1  # Beta(alpha, alpha) of the mixing weight
SMALL_IMAGE_AREA = 96 * 96  # pixels: images below this area count as small
SMALL_RESOLUTION = (160, 128)  # pixels: (resize, random crop) for small images
LARGE_RESOLUTION = (512, 480)  # pixels: (resize, random crop) for the others


def rule_supports(num_train_examples: int) -> tuple[int, ...]:
    """The rule's five supports (optimizer steps) for a training set of this size.

    Returns:
      (end of warm-up, first decay, second decay, third decay, end of training).
    """
    if num_train_examples < 20_000:
        return (100, 200, 300, 400, 500)
    if num_train_examples < 500_000:
        return (500, 3_000, 6_000, 9_000, 10_000)
    return (500, 6_000, 12_000, 18_000, 20_000)


def supports(num_train_examples: int, total_steps: int | None = None) -> tuple[int, ...]:
    """The rule's supports, stretched or shrunk to `total_steps` when given.

    Every support is scaled by total_steps / (the rule's length) and rounded, so
    the warm-up and the decays keep their share of the run.
    """
    rule = rule_supports(num_train_examples)
    if total_steps is None or total_steps == rule[-1]:
        return rule
    return tuple(math.floor(s * total_steps / rule[-1] + 0.5) for s in rule)


def peak_learning_rate(global_batch_size: int) -> float:
    """The rule's rate after warm-up: 0.003 at a global batch of 512, linear in the batch."""
    return BASE_LEARNING_RATE * global_batch_size / BASE_BATCH_SIZE


def learning_rate(step: int, step_supports: Sequence[int], peak: float) -> float:
    """The rate of the optimizer step `step` (0-based) under the given supports.

    Linear warm-up from 0 (step 0) towards `peak` at the first support; then
    `peak` divided by 10 once for each of the second, third and fourth supports
    the step is past (as the authors' code counts: the decay applies from the
    step after the support); 0 from the last support on, where training ends.
    """
    warmup_steps, *decay_steps, end = step_supports
    if step >= end:
        return 0.0
    if step < warmup_steps:
        return peak * step / warmup_steps
    decays = sum(1 for s in decay_steps if s < step)
    return peak / DECAY_FACTOR**decays


def bit_learning_rate(step: int, num_train_examples: int, global_batch_size: int) -> float:
    """BiT-HyperRule's rate at `step` for a training set and a global batch size."""
    return learning_rate(step, rule_supports(num_train_examples),
                         peak_learning_rate(global_batch_size))


def mixup_alpha(num_train_examples: int) -> float:
    """The rule's MixUp alpha: 0.1 from 20,000 training images up, else 0 (off)."""
    return MIXUP_ALPHA if num_train_examples >= MIXUP_MIN_EXAMPLES else 0.0


def resolution(height: int, width: int) -> tuple[int, int]:
    """The rule's (resize, crop) sizes in pixels for a dataset whose images are height x width."""
    return SMALL_RESOLUTION if height * width < SMALL_IMAGE_AREA else LARGE_RESOLUTION


def resize_size_for(crop_size: int, height: int, width: int) -> int:
    """The resize size for a crop size given by the user: the rule's resize/crop ratio
    for images of height x width (1.25 for small images, 16/15 for others)."""
    resize, crop = resolution(height, width)
    return math.floor(crop_size * resize / crop + 0.5)


@keras.saving.register_keras_serializable(package="trainer")
class HyperRuleSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The optimizer's rate per step, from `learning_rate` (the pure function above).

    The rate of every step of the run is computed once, in Python, by
    `learning_rate`; each step looks its rate up by the optimizer's step
    counter, which BackupAndRestore restores, so a resumed run continues the
    schedule where it stopped. The lookup is one gather: no Python per step,
    fine under XLA and on TPUs.
    """

    def __init__(self, step_supports: Sequence[int], peak: float):
        super().__init__()
        self.step_supports = tuple(int(s) for s in step_supports)
        self.peak = float(peak)
        # One rate per step, and 0 past the end (where training has stopped).
        self.rates = tuple(learning_rate(step, self.step_supports, self.peak)
                           for step in range(self.step_supports[-1] + 1))

    def rate(self, step: int) -> float:
        """The rate of optimizer step `step`, as a Python float."""
        return self.rates[min(step, len(self.rates) - 1)]

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        index = tf.minimum(tf.cast(step, tf.int64), len(self.rates) - 1)
        return tf.gather(tf.constant(self.rates, tf.float32), index)

    def get_config(self) -> dict[str, Any]:
        return {"step_supports": list(self.step_supports), "peak": self.peak}
