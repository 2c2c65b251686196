"""The training step: optimizer, loss (label smoothing), gradient accumulation over micro-batches
and an exponential moving average (EMA) of the weights.

`TrainingModel` is the functional model a run trains. Its `train_step`:

- with one micro-batch, is Keras' own step (bit for bit what a plain model does);
- with N, splits each replica's batch into N equal micro-batches, computes
  them one after the other in a `tf.while_loop` (forward, loss, gradient,
  metrics), and applies the mean of their gradients once: one optimizer step
  per global batch, as `--batch_size` says. The partial sums live only inside
  the step, so an interruption can never leave half an accumulation behind:
  a resumed run restarts at a step boundary. Without batch statistics
  (GroupNorm BiT, frozen BatchNorm) the update is the big batch's, up to
  float rounding; BatchNorm layers in training mode normalise each
  micro-batch by its own statistics, as they do each replica's share.
- with --ema_decay, updates the averages after each optimizer step: one
  float32 variable per trainable weight, tracked by the model, so the
  backup, checkpoints/best and a resume keep them.

Everything a run saves for reuse is a plain model (`plain_model`): the serving
export never depends on this class.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
import tf_keras as keras

from trainer.config import TrainConfig, UserError, flag

# The averages' decay warms up as TensorFlow's ExponentialMovingAverage does with
# num_updates: min(decay, (1 + t) / (10 + t)) after t optimizer steps, so a short run
# is not stuck near its initial weights (0.999 alone would keep 37% of them after
# 1,000 steps).
EMA_WARMUP_OFFSET = 10.0
WHOLE_BATCH = "the whole batch in one pass"  # why a replica computes no micro-batches


def accumulation_steps(per_replica_batch_size: int, gradient_accumulation_steps: int | None,
                       micro_batch_size: int | None) -> int:
    """The micro-batches each replica splits its batch into.

    Args:
      per_replica_batch_size: images each replica computes per optimizer step.
      gradient_accumulation_steps: --gradient_accumulation_steps, or None.
      micro_batch_size: --micro_batch_size (at most this many images per pass), or None.

    Returns:
      The given steps; else the fewest that split the batch evenly into
      micro-batches of at most `micro_batch_size`; else 1.
    """
    if gradient_accumulation_steps:
        return gradient_accumulation_steps
    if not micro_batch_size:
        return 1
    return next(steps for steps in range(1, per_replica_batch_size + 1)
                if per_replica_batch_size % steps == 0
                and per_replica_batch_size // steps <= micro_batch_size)


def choose_accumulation(config: TrainConfig, per_replica_batch_size: int) -> tuple[int, str]:
    """The micro-batches of each replica's batch (see `accumulation_steps`), with the reason.

    Raises:
      UserError: the replica's batch does not split into --gradient_accumulation_steps equal
        micro-batches; names the flags.
    """
    steps = accumulation_steps(per_replica_batch_size, config.gradient_accumulation_steps,
                               config.micro_batch_size)
    if per_replica_batch_size % steps:
        raise UserError(
            f"Each replica's batch of {per_replica_batch_size} (--batch_size over the replicas) "
            f"does not split into {flag('gradient_accumulation_steps')}={steps} equal "
            f"micro-batches; use a divisor of {per_replica_batch_size}, set "
            f"{flag('micro_batch_size')} instead, or change --batch_size.")
    micro = per_replica_batch_size // steps
    if config.gradient_accumulation_steps:
        return steps, f"{micro} images each, {flag('gradient_accumulation_steps')}"
    if config.micro_batch_size:
        return steps, f"{micro} images each, at most {flag('micro_batch_size')}="\
                      f"{config.micro_batch_size}"
    return steps, WHOLE_BATCH


def ema_decay_at(decay: float, steps_done: tf.Tensor) -> tf.Tensor:
    """The decay of the update after `steps_done` optimizer steps: min(decay, (1+t)/(10+t))."""
    steps = tf.cast(steps_done, tf.float32)
    return tf.minimum(decay, (1.0 + steps) / (EMA_WARMUP_OFFSET + steps))


class SparseCrossentropyWithSmoothing(keras.losses.Loss):
    """Cross-entropy of integer labels against probabilities, the labels smoothed: the true
    class gets 1 - s + s/K, every other s/K (K classes), as Keras' categorical loss does."""

    def __init__(self, label_smoothing: float, name: str = "smoothed_crossentropy", **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
        one_hot = tf.one_hot(labels, tf.shape(y_pred)[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(one_hot, y_pred,
                                                     label_smoothing=self.label_smoothing)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def create_optimizer(
    config: TrainConfig,
    learning_rate: keras.optimizers.schedules.LearningRateSchedule | None = None,
) -> keras.optimizers.Optimizer:
    """Adam, or SGD with momentum 0.9 (no weight decay), at `learning_rate` (a schedule)
    or else the configured constant rate."""
    rate = config.learning_rate if learning_rate is None else learning_rate
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=0.9)
    return keras.optimizers.Adam(rate)


def create_loss(one_hot_labels: bool, label_smoothing: float) -> str | keras.losses.Loss:
    """The run's loss: cross-entropy of one-hot or soft labels (MixUp) or of integer labels,
    with `label_smoothing` (0: none, Keras' own losses as before)."""
    if one_hot_labels:
        if not label_smoothing:
            return "categorical_crossentropy"
        return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    if not label_smoothing:
        return "sparse_categorical_crossentropy"
    return SparseCrossentropyWithSmoothing(label_smoothing)


def _split(tensor: tf.Tensor, parts: int) -> tf.Tensor:
    """[batch, ...] -> [parts, batch / parts, ...]."""
    return tf.reshape(tensor, tf.concat([[parts, -1], tf.shape(tensor)[1:]], axis=0))


class TrainingModel(keras.Model):
    """A functional model trained in micro-batches, with an optional average of its weights.

    Build it as a functional model: `TrainingModel(inputs, outputs,
    accumulation_steps=N, ema_decay=d)`, inside the strategy's scope (the
    averages are variables of the model).
    """

    def __init__(self, *args: Any, accumulation_steps: int = 1, ema_decay: float = 0.0,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be at least 1, got {accumulation_steps}.")
        self.accumulation_steps = accumulation_steps
        self.ema_decay = ema_decay
        # Identical on every replica, as the weights are: an update in a replica takes
        # the first replica's value, as the optimizer's step counter does.
        self.averages = [
            tf.Variable(tf.cast(tf.identity(variable), tf.float32), trainable=False,
                        name="ema/" + variable.name.split(":")[0],
                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            for variable in (self.trainable_variables if ema_decay else ())]

    def train_step(self, data: Any) -> dict[str, tf.Tensor]:
        if self.accumulation_steps == 1:
            logs = super().train_step(data)
        else:
            logs = self._accumulated_step(data)
        if self.averages:
            self._update_averages()
        return logs

    def _accumulated_step(self, data: Any) -> dict[str, tf.Tensor]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        steps = self.accumulation_steps
        batch = tf.nest.flatten(x)[0].shape[0]
        if batch is not None and batch % steps:
            raise ValueError(f"A replica's batch of {batch} does not split into {steps} "
                             "equal micro-batches.")
        x, y = tf.nest.map_structure(lambda t: _split(t, steps), (x, y))
        if sample_weight is not None:
            sample_weight = _split(sample_weight, steps)
        variables = self.trainable_variables
        optimizer = self.optimizer
        scaled = isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer)

        def micro_step(i: tf.Tensor, sums: list[tf.Tensor]) -> tuple[tf.Tensor, list[tf.Tensor]]:
            xi, yi = tf.nest.map_structure(lambda t: t[i], (x, y))
            wi = None if sample_weight is None else sample_weight[i]
            with tf.GradientTape() as tape:
                predictions = self(xi, training=True)
                # Each micro-batch's loss is its own mean: 1/N of it is its share of the
                # batch's, and keeps float16 gradients as small as the big batch's.
                loss = self.compute_loss(xi, yi, predictions, wi) / steps
                if scaled:  # float16: scaled up so that small gradients do not vanish
                    loss = optimizer.get_scaled_loss(loss)
            gradients = tape.gradient(loss, variables,
                                      unconnected_gradients=tf.UnconnectedGradients.ZERO)
            # Not compute_metrics: its results would synchronise replicas inside the loop.
            self.compiled_metrics.update_state(yi, predictions, wi)
            return i + 1, [s + tf.convert_to_tensor(g) for s, g in zip(sums, gradients)]

        _, gradients = tf.while_loop(lambda i, _: i < steps, micro_step,
                                     (tf.constant(0), [tf.zeros_like(v) for v in variables]))
        if scaled:
            gradients = optimizer.get_unscaled_gradients(gradients)
        optimizer.apply_gradients(zip(gradients, variables))
        return self.get_metrics_result()

    def _update_averages(self) -> None:
        decay = ema_decay_at(self.ema_decay, self.optimizer.iterations)
        for average, variable in zip(self.averages, self.trainable_variables):
            average.assign_sub((1.0 - decay) * (average - tf.cast(variable, tf.float32)))

    def swap_averages(self) -> None:
        """Exchanges the weights and their averages (twice: as before, bit for bit)."""
        for average, variable in zip(self.averages, self.trainable_variables):
            weights = tf.identity(variable)
            variable.assign(tf.cast(average, variable.dtype))
            average.assign(weights)

    def use_averages(self) -> None:
        """Sets the weights to their averages (before the final evaluation and the exports)."""
        for average, variable in zip(self.averages, self.trainable_variables):
            variable.assign(tf.cast(average, variable.dtype))


class AveragesForValidation(keras.callbacks.Callback):
    """Validates the averaged weights: swaps them in when validation begins and out when it
    ends, before any end-of-epoch callback (history, backup, best checkpoint) runs."""

    def on_test_begin(self, logs: dict | None = None) -> None:
        self.model.swap_averages()

    def on_test_end(self, logs: dict | None = None) -> None:
        self.model.swap_averages()


def plain_model(model: keras.Model) -> keras.Model:
    """The same layers as a plain functional model (uint8 images -> probabilities): what
    is saved for serving, without the training step or the averages."""
    return keras.Model(model.inputs, model.outputs, name=model.name)
