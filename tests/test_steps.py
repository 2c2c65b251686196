"""The training step: accumulation equals the big batch (GroupNorm), under every strategy, XLA and
loss scaling; the averaged weights and their warm-up; label smoothing; the micro-batch choice."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from conftest import run_main
from trainer import steps
from trainer.config import TrainConfig, UserError

IMAGES = np.random.default_rng(0).random((64, 8, 8, 3)).astype(np.float32)
LABELS = np.random.default_rng(1).integers(0, 3, 64)


def group_norm_model(accumulation_steps=1, ema_decay=0.0, jit_compile=False, loss=None,
                     plain=False):
    """A small GroupNorm network (no batch statistics), SGD with momentum, seeded."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(32, 3)(inputs)
    x = keras.layers.ReLU()(keras.layers.GroupNormalization(8)(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax", dtype="float32")(x)
    model = (keras.Model(inputs, outputs) if plain else steps.TrainingModel(
        inputs, outputs, accumulation_steps=accumulation_steps, ema_decay=ema_decay))
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  loss or "sparse_categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=jit_compile)
    return model


def trained(model, epochs=2, **fit):
    history = model.fit(IMAGES, LABELS, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
                        **fit)
    return [w.numpy() for w in model.trainable_weights], history.history


def test_one_micro_batch_is_keras_own_step_bit_for_bit():
    plain, plain_history = trained(group_norm_model(plain=True))
    ours, history = trained(group_norm_model(accumulation_steps=1))
    assert all(np.array_equal(a, b) for a, b in zip(plain, ours))
    assert history == plain_history


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_four_micro_batches_make_the_big_batchs_update(jit_compile):
    big, big_history = trained(group_norm_model())
    model = group_norm_model(accumulation_steps=4, jit_compile=jit_compile)
    accumulated, history = trained(model)
    for a, b in zip(big, accumulated):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # One optimizer step per batch of 16; the metrics are the whole batch's.
    assert int(model.optimizer.iterations) == 2 * 64 // 16
    np.testing.assert_allclose(history["loss"], big_history["loss"], rtol=1e-5)
    np.testing.assert_allclose(history["accuracy"], big_history["accuracy"])


def test_micro_batches_on_two_replicas_make_the_global_batchs_update_and_average():
    one_device = group_norm_model(ema_decay=0.9)
    big, _ = trained(one_device)
    # conftest's two CPUs. Not the default all-reduce: a second strategy's collectives in one
    # process reuse the first one's instance keys.
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
    with strategy.scope():
        model = group_norm_model(accumulation_steps=2, ema_decay=0.9)  # 8 per replica, 2 x 4
    accumulated, _ = trained(model)
    for a, b in zip(big, accumulated):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for a, b in zip(one_device.averages, model.averages):  # one copy per replica, all equal
        assert all(np.array_equal(b.values[0].numpy(), copy.numpy()) for copy in b.values)
        np.testing.assert_allclose(a.numpy(), b.values[0].numpy(), atol=1e-6)


def test_loss_scaling_under_mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")  # conftest restores float32
    big_model, model = group_norm_model(), group_norm_model(accumulation_steps=4)
    assert isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer)
    big, _ = trained(big_model)
    accumulated, _ = trained(model)
    for a, b in zip(big, accumulated):  # float16 forward passes of other batch shapes
        np.testing.assert_allclose(a, b, atol=5e-3)
    # Float16 gradients as large as the big batch's: they overflow (and halve the scale) alike.
    assert float(model.optimizer.loss_scale) == float(big_model.optimizer.loss_scale) > 1


def test_an_uneven_split_is_refused():
    model = group_norm_model(accumulation_steps=3)
    with pytest.raises(ValueError, match="batch of 16 does not split into 3"):
        trained(model, epochs=1)


@pytest.mark.parametrize("per_replica, given, micro, expected", [
    (64, None, None, 1), (64, 4, None, 4), (64, None, 16, 4), (64, None, 64, 1),
    (64, None, 100, 1), (48, None, 20, 3), (12, None, 5, 3), (7, None, 2, 7)])
def test_accumulation_steps_split_the_replicas_batch_evenly(per_replica, given, micro, expected):
    assert steps.accumulation_steps(per_replica, given, micro) == expected


def test_a_replicas_batch_that_does_not_split_names_the_flags():
    config = TrainConfig(gradient_accumulation_steps=4)
    assert steps.choose_accumulation(config, 16) == (4, "4 images each, "
                                                     "--gradient_accumulation_steps")
    with pytest.raises(UserError, match=r"batch of 6 .* --gradient_accumulation_steps=4 .*"
                                        r"--micro_batch_size"):
        steps.choose_accumulation(config, 6)  # a global 12 over 2 replicas


@pytest.mark.parametrize("flags, message", [
    (["--batch_size=16", "--gradient_accumulation_steps=3"],
     "--batch_size=16 must split into --gradient_accumulation_steps=3"),
    (["--gradient_accumulation_steps=2", "--micro_batch_size=4"], "give one of them"),
    (["--micro_batch_size=0"], "--micro_batch_size must be at least 1"),
    (["--label_smoothing=1"], "--label_smoothing must be in"),
    (["--ema_decay=1.5"], "--ema_decay must be 0"),
    (["--examples_per_class=0"], "--examples_per_class must be at least 1"),
    (["--export_tflite=int8", "--noexport"], "--export_tflite=int8 converts the SavedModel"),
    (["--export_tflite=int4"], "--export_tflite=int4 is not valid"),
])
def test_bad_settings_exit_2_naming_the_flag(tmp_path, capsys, flags, message):
    code, _, err = run_main(["--experiment=smoke", f"--workdir={tmp_path}/run", *flags], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_averages_follow_the_weights_with_a_warmed_up_decay():
    decay = 0.9
    seen = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(
        [w.numpy() for w in model.trainable_weights]))
    model = group_norm_model(ema_decay=decay)
    initial = [w.numpy() for w in model.trainable_weights]
    trained(model, callbacks=[record])
    expected = initial
    for t, weights in enumerate(seen, start=1):  # t optimizer steps done
        d = min(decay, (1 + t) / (10 + t))
        expected = [d * e + (1 - d) * w for e, w in zip(expected, weights)]
    for average, value in zip(model.averages, expected):
        np.testing.assert_allclose(average.numpy(), value, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(steps.ema_decay_at(0.999, tf.constant([0, 10, 10_000])),
                               [0.1, 11 / 20, 0.999], rtol=1e-6)


def test_swapping_the_averages_in_and_out_is_exact_and_use_keeps_them():
    model = group_norm_model(accumulation_steps=2, ema_decay=0.5)
    weights, _ = trained(model, epochs=1)
    averages = [a.numpy() for a in model.averages]
    assert not np.array_equal(weights[0], averages[0])
    model.swap_averages()
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(averages, model.trainable_weights))
    model.swap_averages()
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(weights, model.trainable_weights))
    model.use_averages()
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(averages, model.trainable_weights))
    # The averages are the model's variables (checkpoints keep them), not the served model's.
    assert {id(a) for a in model.averages} <= {id(w) for w in model.weights}
    assert len(steps.plain_model(model).weights) == len(model.weights) - len(model.averages)


def test_validation_sees_the_averages_and_training_goes_on_from_the_weights():
    model = group_norm_model(ema_decay=0.99)
    _, history = trained(model, epochs=2, validation_data=(IMAGES, LABELS),
                         callbacks=[steps.AveragesForValidation()])
    weights = [w.numpy() for w in model.trainable_weights]
    model.swap_averages()
    loss_of_averages, _ = model.evaluate(IMAGES, LABELS, verbose=0)
    np.testing.assert_allclose(history["val_loss"][-1], loss_of_averages, rtol=1e-6)
    model.swap_averages()
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(weights, model.trainable_weights))


def test_label_smoothing_of_integer_labels_is_kerass_of_one_hot_labels():
    probabilities = tf.nn.softmax(tf.random.stateless_normal((6, 4), seed=(1, 2)))
    labels = tf.constant([0, 3, 1, 1, 2, 0])
    ours = steps.create_loss(one_hot_labels=False, label_smoothing=0.1)
    keras_own = steps.create_loss(one_hot_labels=True, label_smoothing=0.1)
    np.testing.assert_allclose(ours(labels, probabilities),
                               keras_own(tf.one_hot(labels, 4), probabilities), rtol=1e-6)
    assert steps.create_loss(False, 0.0) == "sparse_categorical_crossentropy"
    assert steps.create_loss(True, 0.0) == "categorical_crossentropy"
    # Smoothing pulls the loss of a confident right answer up.
    sure = tf.constant([[0.97, 0.01, 0.01, 0.01]])
    assert float(ours(tf.constant([0]), sure)) > float(
        keras.losses.sparse_categorical_crossentropy([0], sure)[0])
