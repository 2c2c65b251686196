"""--examples_per_class: K training examples per class drawn by the seed from every kind of source,
validation untouched, BiT-HyperRule's length and summary.json following the reduced size."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from trainer import checks
from trainer import config as config_lib
from trainer import experiments, train
from trainer.config import DataConfig, UserError
from trainer.data import few_shot, sources

DIGITS = tuple(str(d) for d in range(10))


def labels_of(source, split):
    return [int(label) for _, label in source.examples[split]().as_numpy_iterator()]


def test_k_per_class_drawn_by_the_seed_in_the_splits_order():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 1])
    kept = few_shot.few_shot(labels, 2, seed=0, class_names=("a", "b", "c"))
    assert list(kept) == sorted(kept) and np.bincount(labels[kept]).tolist() == [2, 2, 2]
    assert list(few_shot.few_shot(labels, 2, 0, "abc")) == list(kept)
    draws = {tuple(few_shot.few_shot(labels, 2, seed, "abc")) for seed in range(10)}
    assert len(draws) > 1
    assert list(few_shot.few_shot(labels, None, 0, "abc")) == list(range(12))
    with pytest.raises(UserError, match="--examples_per_class=4: class c has only 3 training"):
        few_shot.few_shot(labels, 4, 0, ("a", "b", "c"))


@pytest.fixture(scope="module")
def ten_classes(tmp_path_factory):
    """A 10-class folder of 12 PNG images each (120 files), one grey level per class."""
    root = tmp_path_factory.mktemp("ten")
    rng = np.random.default_rng(0)
    for label, name in enumerate(DIGITS):
        (root / name).mkdir()
        for i in range(12):
            pixels = np.clip(20 * label + rng.integers(0, 20, (20, 20, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_a_folder_keeps_k_per_class_and_its_validation(ten_classes):
    full = sources.create_data_source(DataConfig(image_dir=str(ten_classes)), seed=0)
    few = sources.create_data_source(DataConfig(image_dir=str(ten_classes), examples_per_class=5),
                                     seed=0)
    assert few.sizes == {"train": 50, "val": full.sizes["val"]}
    assert np.bincount(labels_of(few, "train")).tolist() == [5] * 10
    assert labels_of(few, "val") == labels_of(full, "val")
    full_names = {full.example_names["train"](k) for k in range(full.sizes["train"])}
    assert {few.example_names["train"](k) for k in range(50)} <= full_names
    assert few.fingerprint != full.fingerprint  # another training set: another cache


def test_synthetic_and_tfds_sources_keep_k_per_class(monkeypatch):
    synthetic = sources.create_data_source(
        DataConfig(dataset="synthetic", synthetic_examples=100, image_size=8,
                   examples_per_class=3), seed=1)
    assert synthetic.sizes["train"] == 15
    assert np.bincount(labels_of(synthetic, "train")).tolist() == [3] * 5
    monkeypatch.setattr(sources, "host_resolves", lambda url: True)
    with tfds.testing.mock_data(num_examples=40):
        config = DataConfig(dataset="tf_flowers", examples_per_class=2)
        few = sources.create_data_source(config, seed=0)
        val = sources.create_data_source(DataConfig(dataset="tf_flowers"), seed=0)
        assert few.sizes == {"train": 10, "val": val.sizes["val"]}
        assert np.bincount(labels_of(few, "train")).tolist() == [2] * 5
        assert few.example_names["train"](0).startswith("tf_flowers train[")


def test_bit_hyperrule_length_follows_the_reduced_training_set():
    def chosen(**values):
        config = checks.resolve(experiments.configure(None, {
            "schedule": "bit_hyperrule", "backbone": "wide_resnet", "dataset": "synthetic",
            "synthetic_examples": 30_000, "image_size": 8, "epochs": 5, **values}))
        return train.choose_from_data(config, sources.create_data_source(config.data, 0))

    assert chosen().train.total_steps == 10_000  # 21,000 training images
    few = chosen(examples_per_class=5)  # 25 training images
    assert few.train.total_steps == 500 and few.data.mixup_alpha == 0.0


@pytest.mark.slow
def test_five_per_class_trains_on_fifty_images(ten_classes, tmp_path):
    summary = train.train_and_evaluate(checks.resolve(config_lib.override(
        experiments.preset("smoke"),
        {"image_dir": str(ten_classes), "examples_per_class": 5, "image_size": 16, "wrn_width": 1,
         "batch_size": 10, "epochs": 1, "export": False, "workdir": str(tmp_path / "run")})))
    assert (summary["train_examples"], summary["steps_per_epoch"]) == (50, 5)
    assert summary["optimizer_steps"] == 5 and summary["val_examples"] == 36
