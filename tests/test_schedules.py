"""BiT-HyperRule: the schedule's numbers, MixUp, resolution, the config it implies, and a tiny run."""

import csv
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import tf_keras as keras
from tensorboard.backend.event_processing import event_accumulator

from trainer import callbacks as callbacks_lib
from trainer import checks
from trainer import experiments
from trainer import compare, schedules, train
from trainer.config import DataConfig, UserError
from trainer.data import augment, decode, pipeline, sources

# --- The schedule as numbers -------------------------------------------------

SMALL, MEDIUM, LARGE = 19_999, 20_000, 500_000  # training images at the regimes' edges


@pytest.mark.parametrize("num_train, expected", [
    (1, (100, 200, 300, 400, 500)),
    (SMALL, (100, 200, 300, 400, 500)),
    (MEDIUM, (500, 3_000, 6_000, 9_000, 10_000)),
    (LARGE - 1, (500, 3_000, 6_000, 9_000, 10_000)),
    (LARGE, (500, 6_000, 12_000, 18_000, 20_000)),
])
def test_supports_follow_the_training_set_size(num_train, expected):
    assert schedules.rule_supports(num_train) == expected
    assert schedules.supports(num_train) == expected


@pytest.mark.parametrize("num_train, step, expected", [
    # Warm-up from 0, linear, to the peak at the first support.
    (SMALL, 0, 0.0), (SMALL, 50, 0.0015), (SMALL, 99, 0.003 * 99 / 100), (SMALL, 100, 0.003),
    # Each decay applies from the step after its support (as the authors' code).
    (SMALL, 200, 0.003), (SMALL, 201, 3e-4), (SMALL, 300, 3e-4), (SMALL, 301, 3e-5),
    (SMALL, 400, 3e-5), (SMALL, 401, 3e-6), (SMALL, 499, 3e-6), (SMALL, 500, 0.0),
    (MEDIUM, 250, 0.0015), (MEDIUM, 500, 0.003), (MEDIUM, 3_000, 0.003), (MEDIUM, 3_001, 3e-4),
    (MEDIUM, 6_001, 3e-5), (MEDIUM, 9_001, 3e-6), (MEDIUM, 9_999, 3e-6), (MEDIUM, 10_000, 0.0),
    (LARGE, 499, 0.003 * 499 / 500), (LARGE, 6_000, 0.003), (LARGE, 6_001, 3e-4),
    (LARGE, 12_001, 3e-5), (LARGE, 18_001, 3e-6), (LARGE, 19_999, 3e-6), (LARGE, 20_000, 0.0),
    (LARGE, 25_000, 0.0),
])
def test_rate_matches_the_rule_at_its_boundaries(num_train, step, expected):
    assert schedules.bit_learning_rate(step, num_train, 512) == pytest.approx(expected, rel=1e-12)


def test_rate_scales_with_the_global_batch_size():
    assert schedules.peak_learning_rate(512) == 0.003
    assert schedules.peak_learning_rate(128) == pytest.approx(0.00075)
    assert schedules.bit_learning_rate(150, SMALL, 64) == pytest.approx(0.003 / 8)
    assert schedules.bit_learning_rate(50, SMALL, 1024) == pytest.approx(0.003)  # half-way up 0.006


def test_total_steps_stretches_the_supports():
    assert schedules.supports(SMALL, total_steps=50) == (10, 20, 30, 40, 50)
    assert schedules.supports(MEDIUM, total_steps=1_000) == (50, 300, 600, 900, 1_000)
    assert schedules.supports(SMALL, total_steps=500) == schedules.rule_supports(SMALL)


def test_keras_schedule_gives_the_pure_functions_rate_at_every_step():
    step_supports, peak = schedules.supports(SMALL, total_steps=40), 0.01
    schedule = schedules.HyperRuleSchedule(step_supports, peak)
    steps = np.arange(0, 45)
    expected = [schedules.learning_rate(int(s), step_supports, peak) for s in steps]
    np.testing.assert_allclose(schedule(tf.constant(steps, tf.int64)).numpy(), expected, rtol=1e-6)
    assert [schedule.rate(int(s)) for s in steps] == expected
    # Serializable, alone and inside an optimizer's config.
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert isinstance(again, schedules.HyperRuleSchedule) and again.rates == schedule.rates
    optimizer = keras.optimizers.SGD(schedule, momentum=0.9)
    assert keras.optimizers.SGD.from_config(optimizer.get_config()).get_config() == (
        optimizer.get_config())


@pytest.mark.parametrize("height, width, expected", [
    (95, 97, (160, 128)),  # 9,215 pixels: just under 96x96
    (96, 96, (512, 480)), (48, 192, (512, 480)), (32, 32, (160, 128)), (375, 500, (512, 480)),
])
def test_resolution_by_area_at_the_96x96_boundary(height, width, expected):
    assert schedules.resolution(height, width) == expected


def test_mixup_is_on_from_20000_training_images():
    assert schedules.mixup_alpha(SMALL) == 0.0
    assert schedules.mixup_alpha(MEDIUM) == 0.1


# --- What the rule sets in the configuration ------------------------------------

def rule_config(**values):
    return checks.resolve(experiments.configure(None, {"schedule": "bit_hyperrule", **values}))


def test_schedule_brings_the_rest_of_the_rule_unless_told_otherwise():
    rule = rule_config()
    assert (rule.train.optimizer, rule.train.early_stopping_patience, rule.data.augment,
            rule.train.epochs) == ("sgd", 0, "resize_crop", 10)
    # Left to the data, decided when the run starts.
    assert rule.data.image_size is None and rule.data.mixup_alpha is None
    assert rule.train.learning_rate is None and rule.train.total_steps is None
    given = rule_config(optimizer="adam", early_stopping_patience=3, augment="flip_crop",
                        epochs=5, image_size=64, mixup_alpha=0.0, learning_rate=0.01,
                        total_steps=100)
    assert (given.train.optimizer, given.train.early_stopping_patience, given.data.augment,
            given.train.epochs, given.data.image_size, given.data.mixup_alpha,
            given.train.learning_rate, given.train.total_steps) == (
        "adam", 3, "flip_crop", 5, 64, 0.0, 0.01, 100)
    constant = checks.resolve(experiments.configure(None, {}))
    assert (constant.train.optimizer, constant.data.augment, constant.data.image_size) == (
        "adam", "none", 224)


def test_preset_fine_tunes_bit_m_r50x1_on_flowers():
    preset = checks.resolve(experiments.configure("bit_hyperrule", {}))
    assert (preset.model.backbone, preset.model.bit_variant, preset.model.trainable) == (
        "bit", "m-r50x1", True)
    assert (preset.data.dataset, preset.train.schedule, preset.train.optimizer) == (
        "tf_flowers", "bit_hyperrule", "sgd")
    other = checks.resolve(experiments.configure("bit_hyperrule", {"bit_variant": "s-r101x3"}))
    assert other.model.bit_variant == "s-r101x3"


@pytest.mark.parametrize("values, flag", [
    ({"schedule": "cosine"}, "--schedule"),
    ({"total_steps": 100}, "--total_steps=100 applies to --schedule=bit_hyperrule"),
    ({"schedule": "bit_hyperrule", "total_steps": 0}, "--total_steps"),
    ({"schedule": "bit_hyperrule", "total_steps": 500, "epochs": 3}, "--epochs=3 .* 1, 2, 4, 5"),
    ({"resize_size": 300}, "--resize_size=300 applies to --augment=resize_crop"),
    ({"augment": "resize_crop", "image_size": 64, "resize_size": 32}, "--resize_size"),
    ({"mixup_alpha": -0.5}, "--mixup_alpha"),
    ({"mixup_alpha": None}, "--mixup_alpha must be given"),
    ({"image_size": None}, "--image_size must be given"),
])
def test_bad_rule_values_name_their_flag(values, flag):
    with pytest.raises(UserError, match=flag):
        checks.resolve(experiments.configure(None, values))


def fake_source(num_train, height=32, width=32):
    return types.SimpleNamespace(sizes={"train": num_train, "val": 10},
                                 typical_image_size=lambda: (height, width))


def test_mixup_length_and_rate_are_chosen_from_the_training_set_size():
    small = train.choose_from_data(rule_config(batch_size=64), fake_source(SMALL))
    assert (small.data.mixup_alpha, small.train.total_steps) == (0.0, 500)
    assert small.train.learning_rate == pytest.approx(0.003 * 64 / 512)
    medium = train.choose_from_data(rule_config(), fake_source(MEDIUM))
    assert (medium.data.mixup_alpha, medium.train.total_steps) == (0.1, 10_000)
    kept = train.choose_from_data(rule_config(mixup_alpha=0.0, total_steps=30, epochs=3,
                                              learning_rate=0.1), fake_source(MEDIUM))
    assert (kept.data.mixup_alpha, kept.train.total_steps, kept.train.learning_rate) == (
        0.0, 30, 0.1)
    with pytest.raises(UserError, match="--epochs=3 .* 500 steps"):
        train.choose_from_data(rule_config(epochs=3), fake_source(SMALL))


def test_resolution_is_chosen_from_the_images_area_unless_given():
    small = train.choose_from_data(rule_config(), fake_source(100, 95, 97))
    assert (small.data.image_size, small.data.resize_size) == (128, 160)
    large = train.choose_from_data(rule_config(), fake_source(100, 96, 96))
    assert (large.data.image_size, large.data.resize_size) == (480, 512)
    given = train.choose_from_data(rule_config(image_size=224), fake_source(100, 96, 96))
    assert (given.data.image_size, given.data.resize_size) == (224, 239)  # 224 * 512 / 480
    given = train.choose_from_data(rule_config(image_size=16), fake_source(100, 24, 24))
    assert (given.data.image_size, given.data.resize_size) == (16, 20)  # 16 * 160 / 128
    with pytest.raises(UserError, match="--resize_size"):
        train.choose_from_data(rule_config(resize_size=300), fake_source(100, 96, 96))


def test_the_log_names_only_what_was_chosen_from_the_data_with_the_real_sizes(caplog):
    caplog.set_level("INFO", logger="absl")  # other tests' flags may have raised its level
    train.choose_from_data(rule_config(image_size=224, batch_size=64), fake_source(SMALL, 96, 96))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Chosen from")]
    assert lines == [
        f"Chosen from the data ({SMALL} training images; typical image 96x96, the median area "
        "of a sample): --mixup_alpha=0, --total_steps=500, --resize_size=239.",
        "Chosen from the batch size: --learning_rate=0.000375 (BiT-HyperRule: 0.003 x 64 / 512)."]
    assert not [r for r in caplog.records if "480" in r.getMessage() or "512 and" in r.getMessage()]
    caplog.clear()
    train.choose_from_data(rule_config(image_size=224, resize_size=256, mixup_alpha=0.0,
                                       total_steps=100, epochs=1, learning_rate=0.01),
                           fake_source(SMALL, 96, 96))
    assert not [r for r in caplog.records if r.getMessage().startswith("Chosen from")]


# --- The data pipeline: sizes, random resized crops, MixUp -----------------------

def test_typical_image_size_reads_headers_of_folders_and_tfds(image_dir, monkeypatch):
    source = sources.create_data_source(DataConfig(image_dir=image_dir, val_fraction=0.25), 0)
    assert source.typical_image_size() == (30, 40)  # conftest writes 40 wide, 30 high
    synthetic = sources.create_data_source(
        DataConfig(dataset="synthetic", synthetic_examples=10, image_size=None), 0)
    assert synthetic.typical_image_size() == (sources.SYNTHETIC_IMAGE_SIZE,) * 2
    monkeypatch.setattr(sources, "host_resolves", lambda url: True)
    with tfds.testing.mock_data(num_examples=10):
        flowers = sources.create_data_source(DataConfig(dataset="tf_flowers"), 0)
        height, width = flowers.typical_image_size()
    assert height > 0 and width > 0


def test_training_crops_come_from_the_resized_image_and_evaluation_only_resizes(image_dir,
                                                                                tmp_path):
    source = sources.create_data_source(DataConfig(
        image_dir=image_dir, val_fraction=0.25, image_size=16, resize_size=20,
        augment="resize_crop", cache="none"), 0)
    encoded = [x for x, _ in source.examples["train"]().as_numpy_iterator()]
    stored = [decode.decode_image(x, 20).numpy() for x in encoded]
    windows = [w for image in stored for top in range(5) for left in range(5)
               for w in (image[top:top + 16, left:left + 16],
                         image[top:top + 16, left:left + 16][:, ::-1])]
    images, _ = next(iter(pipeline.create_dataset(source, "train", 14)))
    assert images.shape == (14, 16, 16, 3)
    for image in images.numpy():
        assert any(np.array_equal(image, w) for w in windows)
    val_images, _ = next(iter(pipeline.create_dataset(source, "val", 4)))
    expected = [decode.decode_image(x, 16).numpy()
                for x, _ in source.examples["val"]().as_numpy_iterator()]
    np.testing.assert_array_equal(val_images.numpy(), np.stack(expected))
    # Training images are stored (and cached) at 20 px: another size is another cache.
    other = sources.create_data_source(DataConfig(
        image_dir=image_dir, val_fraction=0.25, image_size=16, resize_size=24,
        augment="resize_crop", cache=str(tmp_path / "c")), 0)
    same = sources.create_data_source(DataConfig(
        image_dir=image_dir, val_fraction=0.25, image_size=16, resize_size=20,
        augment="resize_crop", cache=str(tmp_path / "c")), 0)
    assert other.fingerprint != same.fingerprint


def test_mixup_mixes_images_and_labels_with_one_weight_per_batch():
    batch = 6
    values = np.array([0, 40, 90, 150, 200, 255], np.float32)  # one grey level per example
    images = tf.constant(np.broadcast_to(values[:, None, None, None], (batch, 4, 4, 3)), tf.uint8)
    labels = tf.one_hot(tf.range(batch), batch)  # each example its own class
    mixed_pairs = 0
    for _ in range(5):
        mixed_images, mixed_labels = augment.mixup(images, labels, alpha=1.0)
        mixed_labels = mixed_labels.numpy()
        np.testing.assert_allclose(mixed_labels.sum(axis=1), 1.0, rtol=1e-6)
        weights = set()
        for i in range(batch):
            partners = [j for j in np.flatnonzero(mixed_labels[i]) if j != i]
            if not partners:  # mixed with itself
                assert mixed_labels[i, i] == 1.0
                continue
            [j] = partners
            weight = mixed_labels[i, i]
            weights.add(round(float(weight), 6))
            exact = weight * values[i] + (1 - weight) * values[j]
            assert np.all(np.abs(mixed_images.numpy()[i].astype(np.float32) - exact) <= 0.5 + 1e-3)
            mixed_pairs += 1
        assert len(weights) <= 1  # one weight for the whole batch
    assert mixed_pairs >= 20


def test_mixup_turns_labels_one_hot_for_every_split_and_leaves_them_alone_when_off(image_dir):
    def batches(alpha):
        source = sources.create_data_source(DataConfig(
            image_dir=image_dir, val_fraction=0.25, image_size=16, mixup_alpha=alpha), 0)
        return next(iter(pipeline.create_dataset(source, "train", 8))), next(iter(pipeline.create_dataset(source, "val", 4)))

    (_, train_labels), (_, val_labels) = batches(0.0)
    assert train_labels.dtype == tf.int64 and val_labels.dtype == tf.int64
    (_, soft), (_, one_hot) = batches(0.1)
    assert soft.shape == (8, 3) and soft.dtype == tf.float32
    np.testing.assert_array_equal(one_hot.numpy(), tf.one_hot(val_labels, 3).numpy())


# --- A tiny run under the rule, interrupted and resumed ---------------------------

TINY_RULE = {"schedule": "bit_hyperrule", "backbone": "wide_resnet", "wrn_width": 1,
             "dataset": "synthetic", "synthetic_examples": 40, "val_fraction": 0.25,
             "image_size": 16, "batch_size": 4, "epochs": 2, "precision": "float32",
             "jit_compile": "false", "export": False, "mixup_alpha": 0.1,
             "steps_per_execution": 25}  # the rates are still logged for every step


class Interrupted(Exception):
    pass


class InterruptAfterFirstEpoch(keras.callbacks.Callback):
    """Stops the process's run after epoch 1's backup, as a kill would."""

    def on_epoch_end(self, epoch, logs=None):
        raise Interrupted


def step_rates(logdir):
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return {e.step: float(tf.make_ndarray(e.tensor_proto))
            for e in acc.Tensors("step_learning_rate")}


@pytest.mark.slow
def test_rule_run_takes_the_rules_steps_logs_each_rate_and_resumes_at_the_right_step(
        tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    config = checks.resolve(experiments.configure(None, {**TINY_RULE, "workdir": str(workdir)}))
    create_callbacks = callbacks_lib.create_callbacks
    monkeypatch.setattr(train.callbacks_lib, "create_callbacks",
                        lambda *a, **k: create_callbacks(*a, **k) + [InterruptAfterFirstEpoch()])
    with pytest.raises(Interrupted):
        train.train_and_evaluate(config)
    monkeypatch.undo()
    first_epoch = (workdir / "history.csv").read_text()
    summary = train.train_and_evaluate(config)

    # 30 training images: the rule's 500 steps, in 2 epochs of 250, on one-hot labels.
    step_supports, peak = schedules.rule_supports(30), schedules.peak_learning_rate(4)
    assert summary["optimizer_steps"] == 500 and summary["steps_per_epoch"] == 250
    assert summary["mixup_alpha"] == 0.1 and summary["learning_rate"] == pytest.approx(peak)
    # config.json leaves the rate to the rule; the comparison table shows the one used.
    assert compare.report_row(compare.read_run(str(workdir), "run"))["learning_rate"] == (
        pytest.approx(peak))
    with open(workdir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert (workdir / "history.csv").read_text().startswith(first_epoch)  # epoch 1 not redone
    assert all(np.isfinite(float(row["loss"])) for row in rows)
    # The rate of each epoch's last step: epoch 2 continued the schedule at step 250.
    for row, last_step in zip(rows, (249, 499)):
        assert float(row["learning_rate"]) == pytest.approx(
            schedules.learning_rate(last_step, step_supports, peak), rel=1e-6)
    rates = step_rates(workdir / "train")
    assert sorted(rates) == list(range(500))
    for step, rate in rates.items():
        assert rate == pytest.approx(schedules.learning_rate(step, step_supports, peak),
                                     rel=1e-6, abs=1e-12)
