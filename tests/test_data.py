"""Data sources and pipelines: image folders, TFDS (mocked), synthetic."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from trainer import data
from trainer.config import DataConfig, UserError

from conftest import CLASSES


def folder_config(image_dir, **kw):
    return DataConfig(image_dir=image_dir, image_size=16, val_fraction=0.25, **kw)


def labels_of(ds):
    return np.concatenate([y.numpy() for _, y in ds])


def test_image_folder_yields_uint8_images_and_sorted_class_labels(image_dir):
    source = data.create_data_source(folder_config(image_dir), seed=1)
    assert source.class_names == CLASSES
    assert source.sizes == {"train": 14, "val": 4}  # 18 images, 25% held out (rounded)
    images, labels = next(iter(source.dataset("val", 4)))
    assert images.shape == (4, 16, 16, 3) and images.dtype == tf.uint8
    assert labels.dtype == tf.int64
    # Each class was written in its own grey level, so labels can be checked by pixels.
    for image, label in zip(images.numpy(), labels.numpy()):
        assert abs(image.mean() - (40 + 90 * label + 14.5)) < 12


def test_split_is_deterministic_per_seed_and_disjoint(image_dir):
    def split(seed):
        source = data.create_data_source(folder_config(image_dir), seed=seed)
        return [sorted(f.numpy() for f, _ in source.examples[s]()) for s in ("train", "val")]

    train, val = split(3)
    assert split(3) == [train, val]
    assert split(4) != [train, val]
    assert not set(train) & set(val) and len(train) + len(val) == 18


def test_training_pipeline_repeats_with_full_batches(image_dir):
    source = data.create_data_source(folder_config(image_dir, augment="flip_crop"), seed=0)
    batches = list(source.dataset("train", 5).take(6))  # more than one epoch of 14
    assert all(images.shape == (5, 16, 16, 3) for images, _ in batches)
    assert data.steps_per_epoch(source.sizes["train"], 5) == 2


def test_train_data_is_sharded_per_input_pipeline_and_val_read_whole(image_dir):
    source = data.create_data_source(folder_config(image_dir), seed=0)
    contexts = [tf.distribute.InputContext(2, i, 2) for i in range(2)]
    shards = [list(source.examples["train"]().shard(2, i).as_numpy_iterator()) for i in range(2)]
    assert sum(len(s) for s in shards) == 14
    for ctx in contexts:
        val = source.dataset("val", 1, ctx)
        assert len(labels_of(val)) == 4
        train_first = source.dataset("train", 7, ctx).take(1)
        assert next(iter(train_first))[0].shape[0] == 7


def test_unreadable_files_are_skipped_with_a_count(image_dir, caplog):
    open(os.path.join(image_dir, "cats", "empty.jpg"), "wb").close()
    with open(os.path.join(image_dir, "dogs", "notes.jpg"), "w") as f:
        f.write("not a picture")
    noise = np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    cut = os.path.join(image_dir, "owls", "cut.jpg")
    Image.fromarray(noise).save(cut)
    with open(cut, "rb") as f:
        jpeg = f.read()
    with open(cut, "wb") as f:  # header intact, body cut short
        f.write(jpeg[: len(jpeg) * 4 // 5])
    open(os.path.join(image_dir, "owls", ".hidden.jpg"), "wb").close()
    paths, _, _ = data.list_image_folder(image_dir)
    assert len(paths) == 18
    assert "Skipped 3 of 21" in caplog.text
    assert "cut.jpg (truncated JPEG" in caplog.text


def test_folder_errors_name_the_flag(tmp_path):
    with pytest.raises(UserError, match="--image_dir"):
        data.create_data_source(folder_config(str(tmp_path / "missing")), 0)
    (tmp_path / "only" / "one").mkdir(parents=True)
    with pytest.raises(UserError, match="at least 2 class"):
        data.create_data_source(folder_config(str(tmp_path / "only")), 0)


def test_empty_validation_split_is_an_error(image_dir):
    with pytest.raises(UserError, match="--val_fraction"):
        data.create_data_source(DataConfig(image_dir=image_dir, val_fraction=0.01), 0)


def test_tfds_source_on_mock_data(monkeypatch):
    # mock_data replaces the download; the offline check must not look up any host.
    monkeypatch.setattr(data, "host_resolves", lambda url: True)
    with tfds.testing.mock_data(num_examples=20):
        source = data.create_data_source(DataConfig(dataset="tf_flowers", image_size=16), 0)
        assert source.class_names == ("dandelion", "daisy", "tulips", "sunflowers", "roses")
        assert source.sizes == {"train": 14, "val": 6}
        val = list(source.dataset("val", 4))
    assert [images.shape[0] for images, _ in val] == [4, 2]
    assert all(images.dtype == tf.uint8 and images.shape[1:] == (16, 16, 3) for images, _ in val)
    assert all(0 <= label < 5 for label in np.concatenate([y.numpy() for _, y in val]))


def test_unprepared_tfds_data_dir_names_the_way_out(tmp_path):
    with pytest.raises(UserError, match="--data_dir.*--image_dir"):
        data.create_data_source(DataConfig(dataset="tf_flowers", data_dir=str(tmp_path)), 0)


def test_synthetic_images_are_deterministic_and_balanced():
    images, labels = data.synthetic_images(200, 16, seed=5)
    again, _ = data.synthetic_images(200, 16, seed=5)
    assert images.dtype == np.uint8 and images.shape == (200, 16, 16, 3)
    assert np.array_equal(images, again)
    assert set(labels) == set(range(data.SYNTHETIC_CLASSES))
    source = data.create_data_source(DataConfig(dataset="synthetic", synthetic_examples=50, image_size=16), 0)
    assert source.sizes == {"train": 35, "val": 15} and source.num_classes == 5


def test_file_cache_is_named_by_split_and_config(image_dir, tmp_path):
    prefix = str(tmp_path / "cache" / "flowers")
    source = data.create_data_source(folder_config(image_dir, cache=prefix), 0)
    first = labels_of(source.dataset("val", 4))
    again = labels_of(source.dataset("val", 4))  # read back from the file cache
    assert np.array_equal(first, again)
    names = os.listdir(tmp_path / "cache")
    assert any(n.startswith("flowers-val-") for n in names)
    resized = data.create_data_source(folder_config(image_dir, cache=prefix), 0)
    assert resized._cache_file("val", 0, 1) == source._cache_file("val", 0, 1)
    other = data.create_data_source(DataConfig(image_dir=image_dir, image_size=20, val_fraction=0.25,
                                               cache=prefix), 0)
    assert other._cache_file("val", 0, 1) != source._cache_file("val", 0, 1)


def test_preview_shows_training_images():
    source = data.create_data_source(DataConfig(dataset="synthetic", synthetic_examples=20, image_size=16), 0)
    preview = source.preview(8)
    assert preview.shape == (8, 16, 16, 3) and preview.dtype == tf.uint8


def test_offline_download_fails_fast_naming_the_way_out(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # nothing prepared there

    def no_dns(*_):
        raise OSError("Name or service not known")

    monkeypatch.setattr(data.socket, "getaddrinfo", no_dns)
    assert not data.host_resolves("https://www.tensorflow.org/datasets")
    with pytest.raises(UserError, match="looks offline.*--data_dir.*--image_dir"):
        data.create_data_source(DataConfig(dataset="tf_flowers"), 0)
