"""Data sources and pipelines: image folders, TFDS (mocked), synthetic; decoding; caches."""

import collections
import io
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from trainer import checks
from trainer import config as config_lib
from trainer import experiments
from trainer import train
from trainer.data import cache, decode, folders, pipeline, sources
from trainer.config import DataConfig, UserError

from conftest import CLASSES, run_main


def folder_config(image_dir, **kw):
    return DataConfig(**{"image_dir": image_dir, "image_size": 16, "val_fraction": 0.25, **kw})


def labels_of(ds):
    return np.concatenate([y.numpy() for _, y in ds])


def test_image_folder_yields_uint8_images_and_sorted_class_labels(image_dir):
    source = sources.create_data_source(folder_config(image_dir), seed=1)
    assert source.class_names == CLASSES
    assert source.sizes == {"train": 14, "val": 4}  # 18 images, 25% held out (rounded)
    images, labels = next(iter(pipeline.create_dataset(source, "val", 4)))
    assert images.shape == (4, 16, 16, 3) and images.dtype == tf.uint8
    assert labels.dtype == tf.int64
    # Each class was written in its own grey level, so labels can be checked by pixels.
    for image, label in zip(images.numpy(), labels.numpy()):
        assert abs(image.mean() - (40 + 90 * label + 14.5)) < 12


def test_split_is_deterministic_per_seed_and_disjoint(image_dir):
    def split(seed):
        source = sources.create_data_source(folder_config(image_dir), seed=seed)
        return [sorted(f.numpy() for f, _ in source.examples[s]()) for s in ("train", "val")]

    train, val = split(3)
    assert split(3) == [train, val]
    assert split(4) != [train, val]
    assert not set(train) & set(val) and len(train) + len(val) == 18


def test_training_pipeline_repeats_with_full_batches(image_dir):
    source = sources.create_data_source(folder_config(image_dir, augment="flip_crop"), seed=0)
    batches = list(pipeline.create_dataset(source, "train", 5).take(6))  # more than one epoch of 14
    assert all(images.shape == (5, 16, 16, 3) for images, _ in batches)
    assert pipeline.steps_per_epoch(source.sizes["train"], 5) == 2


def files_by_pixels(source, split):
    """The split's files, keyed by the bytes of their decoded image (every file differs)."""
    paths = [source.example_names[split](k) for k in range(source.sizes[split])]
    return {decode.decode_image(tf.io.read_file(p), 16).numpy().tobytes(): p for p in paths}


def test_train_data_is_sharded_per_input_pipeline_and_val_read_whole(image_dir):
    source = sources.create_data_source(folder_config(image_dir), seed=0)
    train_files, val_files = files_by_pixels(source, "train"), files_by_pixels(source, "val")
    assert len(train_files) == 14 and len(val_files) == 4
    shards = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                             num_replicas_in_sync=2)
        # 7 = 14 / 2: the first batch of a pipeline is one epoch of its shard.
        images, _ = next(iter(pipeline.create_dataset(source, "train", 7, context)))
        shards.append({train_files[image.tobytes()] for image in images.numpy()})
        val = np.concatenate([x.numpy()
                              for x, _ in pipeline.create_dataset(source, "val", 3, context)])
        assert sorted(val_files[image.tobytes()] for image in val) == sorted(val_files.values())
    assert len(shards[0]) == len(shards[1]) == 7
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(train_files.values())


def test_files_tensorflow_cannot_decode_are_left_out_by_name(image_dir, caplog):
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
    paths, _, _ = folders.list_image_folder(image_dir)
    assert len(paths) == 19  # the header checks pass the cut JPEG: TensorFlow judges it
    assert "Skipped 2 of 21" in caplog.text
    source = sources.create_data_source(folder_config(image_dir), seed=0)
    val_files = [source.example_names["val"](k) for k in range(source.sizes["val"])]
    val_images = sum(int(x.shape[0]) for x, _ in pipeline.create_dataset(source, "val", 1))
    next(iter(pipeline.create_dataset(source, "train", 1)))  # the shuffle buffer reads a whole pass
    assert val_images == source.sizes["val"] - (cut in val_files)
    split = "val" if cut in val_files else "train"
    warning = f"Left out 1 of {source.sizes[split]} images that TensorFlow cannot decode"
    assert warning in caplog.text and cut in caplog.text.split(warning)[1].splitlines()[0]
    assert caplog.text.count("TensorFlow cannot decode") == 1


def test_folder_errors_name_the_flag(tmp_path):
    with pytest.raises(UserError, match="--image_dir"):
        sources.create_data_source(folder_config(str(tmp_path / "missing")), 0)
    (tmp_path / "only" / "one").mkdir(parents=True)
    with pytest.raises(UserError, match="at least 2 class"):
        sources.create_data_source(folder_config(str(tmp_path / "only")), 0)


def test_empty_validation_split_is_an_error(image_dir):
    with pytest.raises(UserError, match="--val_fraction"):
        sources.create_data_source(DataConfig(image_dir=image_dir, val_fraction=0.01), 0)


def test_tfds_source_on_mock_data(monkeypatch):
    # mock_data replaces the download; the offline check must not look up any host.
    monkeypatch.setattr(sources, "host_resolves", lambda url: True)
    with tfds.testing.mock_data(num_examples=20):
        source = sources.create_data_source(DataConfig(dataset="tf_flowers", image_size=16), 0)
        assert source.class_names == ("dandelion", "daisy", "tulips", "sunflowers", "roses")
        assert source.sizes == {"train": 14, "val": 6}
        val = list(pipeline.create_dataset(source, "val", 4))
    assert [images.shape[0] for images, _ in val] == [4, 2]
    assert all(images.dtype == tf.uint8 and images.shape[1:] == (16, 16, 3) for images, _ in val)
    assert all(0 <= label < 5 for label in np.concatenate([y.numpy() for _, y in val]))


def test_unprepared_tfds_data_dir_names_the_way_out(tmp_path):
    with pytest.raises(UserError, match="--data_dir.*--image_dir"):
        sources.create_data_source(DataConfig(dataset="tf_flowers", data_dir=str(tmp_path)), 0)


def test_synthetic_images_are_deterministic_and_balanced():
    images, labels = sources.synthetic_images(200, 16, seed=5)
    again, _ = sources.synthetic_images(200, 16, seed=5)
    assert images.dtype == np.uint8 and images.shape == (200, 16, 16, 3)
    assert np.array_equal(images, again)
    assert set(labels) == set(range(sources.SYNTHETIC_CLASSES))
    source = sources.create_data_source(DataConfig(dataset="synthetic", synthetic_examples=50, image_size=16), 0)
    assert source.sizes == {"train": 35, "val": 15} and source.num_classes == 5


def file_source(image_dir, cache_dir, **kw):
    return pipeline.choose_cache(
        sources.create_data_source(folder_config(image_dir, cache="file", **kw), 0),
        cache_dir=str(cache_dir))


def entries(cache_dir):
    return sorted(n for n in os.listdir(cache_dir) if not n.startswith("."))


def test_file_cache_is_published_once_and_read_back_without_the_files(image_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    first = file_source(image_dir, cache_dir)
    val = [x.numpy() for x, _ in pipeline.create_dataset(first, "val", 4)]
    assert entries(cache_dir) == [f"val-{first.fingerprint}"]
    again = file_source(image_dir, cache_dir)
    shutil.move(image_dir, tmp_path / "gone")  # decoding is impossible now: only the cache can answer
    read_back = (x.numpy() for x, _ in pipeline.create_dataset(again, "val", 4))
    assert all(np.array_equal(a, b) for a, b in zip(val, read_back))
    assert entries(cache_dir) == [f"val-{first.fingerprint}"]


def test_file_cache_changes_with_the_files_and_settings_and_keeps_no_stale_entry(image_dir, tmp_path):
    cache_dir = tmp_path / "cache"

    def val_images(source):
        return sum(int(x.shape[0]) for x, _ in pipeline.create_dataset(source, "val", 2))

    before = file_source(image_dir, cache_dir)
    assert val_images(before) == 4
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(os.path.join(image_dir, "owls", "new.png"))
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(os.path.join(image_dir, "dogs", "new.png"))
    added = file_source(image_dir, cache_dir)  # 20 images: 5 for validation
    assert added.fingerprint != before.fingerprint and val_images(added) == added.sizes["val"] == 5
    assert entries(cache_dir) == [f"val-{added.fingerprint}"]  # the stale entry is gone
    for name in ("owls/new.png", "dogs/new.png", "cats/cats 1.jpg"):
        os.remove(os.path.join(image_dir, name))
    removed = file_source(image_dir, cache_dir)  # 17 images: 4 for validation
    assert removed.fingerprint not in (before.fingerprint, added.fingerprint)
    assert val_images(removed) == removed.sizes["val"] == 4
    assert entries(cache_dir) == [f"val-{removed.fingerprint}"]
    touched = os.path.join(image_dir, "dogs", "dogs 2.png")
    os.utime(touched, ns=(0, os.stat(touched).st_mtime_ns + 10**9))  # same name and size, new mtime
    assert file_source(image_dir, cache_dir).fingerprint != removed.fingerprint
    same = file_source(image_dir, cache_dir)
    assert file_source(image_dir, cache_dir, global_batch_size=3).fingerprint == same.fingerprint
    assert file_source(image_dir, cache_dir, image_size=20).fingerprint != same.fingerprint


def test_runs_that_read_the_same_images_at_the_same_size_share_one_cache_name(image_dir):
    def name(**kw):
        return sources.create_data_source(folder_config(image_dir, **kw), 0).fingerprint

    # The random parts come after the cache: a sweep of presets shares the decoded images.
    assert name() == name(augment="flip_crop", mixup_alpha=0.1, global_batch_size=3)
    assert name() != name(image_size=20)
    # Random resized crops store the training images at --resize_size.
    crops = name(augment="resize_crop", resize_size=20)
    assert crops not in (name(), name(image_size=20))
    assert crops == name(augment="resize_crop", resize_size=20, mixup_alpha=0.1)
    assert name() != name(val_fraction=0.5)
    assert name() != sources.create_data_source(folder_config(image_dir), 1).fingerprint


def test_concurrent_writers_of_one_cache_each_write_their_own(image_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    first, second = file_source(image_dir, cache_dir), file_source(image_dir, cache_dir)
    slow = iter(pipeline.create_dataset(first, "val", 1))
    next(slow)  # first's pass is writing
    (writing,) = entries(cache_dir)
    assert ".tmp-" in writing and "cache_0.lockfile" in os.listdir(cache_dir / writing)
    # A new FileCache on the directory leaves a live writer's temporary alone.
    assert sum(int(x.shape[0]) for x, _ in pipeline.create_dataset(second, "val", 4)) == 4
    assert entries(cache_dir) == sorted([writing, f"val-{first.fingerprint}"])
    assert sum(1 for _ in slow) == 3  # first finishes its own pass; the published entry stays
    assert entries(cache_dir) == [f"val-{first.fingerprint}"]


SHARED_CACHE_RUN = """
import sys
import numpy as np
import tensorflow as tf
from trainer.data import cache

directory, pause = sys.argv[1], sys.argv[2] == "pause"

def images():  # decoded images as a run's first pass delivers them
    for label in range(4):
        if pause and label == 2:  # halfway through writing: wait for the test's word
            print("writing", flush=True)
            sys.stdin.readline()
        yield np.full((8, 8, 3), 10 * label, np.uint8), label

spec = (tf.TensorSpec((8, 8, 3), tf.uint8), tf.TensorSpec((), tf.int64))
ds = cache.cache_examples(tf.data.Dataset.from_generator(images, output_signature=spec),
                          cache.CachePlan("file", directory), "train", "same-images", 0, 1)
for passes in range(2):  # the second pass reads what the first wrote or found
    print("read", [(int(x[0, 0, 0]), int(y)) for x, y in ds.as_numpy_iterator()], flush=True)
"""


@pytest.mark.slow
def test_two_processes_sharing_a_cache_directory_publish_one_whole_entry(tmp_path):
    """Two runs on one --cache=DIR, the first paused halfway through writing while the
    second writes and publishes: each reads whole images, one entry is published, and
    the paused writer's temporary goes away when it finishes. The processes wait on
    each other's words (pipes), never on sleeps."""
    cache_dir = tmp_path / "shared"
    first = subprocess.Popen([sys.executable, "-c", SHARED_CACHE_RUN, str(cache_dir), "pause"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "writing\n"
        (writing,) = entries(cache_dir)
        assert ".tmp-" in writing
        second = subprocess.run([sys.executable, "-c", SHARED_CACHE_RUN, str(cache_dir), "go"],
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr[-3000:]
        expected = "read [(0, 0), (10, 1), (20, 2), (30, 3)]\n"
        assert second.stdout == 2 * expected
        assert entries(cache_dir) == sorted([writing, "train-0of1-same-images"])
        first.stdin.write("go\n")
        first.stdin.close()
        assert first.stdout.read() == 2 * expected and first.wait(timeout=300) == 0
    finally:
        first.kill()
        first.wait()
    assert entries(cache_dir) == ["train-0of1-same-images"]


WRITER_KILLED_MID_PASS = """
import os, sys, time
import numpy as np
import tensorflow as tf
from trainer import config as config_lib
from trainer.data import cache, pipeline, sources
config = config_lib.from_json(open(sys.argv[1]).read())
source = pipeline.choose_cache(sources.create_data_source(config.data, config.seed),
                              cache_dir=os.path.join(config.workdir, cache.WORKDIR_CACHE))

def images():  # the trainer's cache entry for the training split, fed until it blocks
    for label in range(3):
        yield np.zeros((16, 16, 3), np.uint8), label
    open(sys.argv[2], "w").close()
    time.sleep(600)

spec = (tf.TensorSpec((16, 16, 3), tf.uint8), tf.TensorSpec((), tf.int64))
batches = iter(cache.cache_examples(tf.data.Dataset.from_generator(images, output_signature=spec),
                                    source.cache, "train", source.fingerprint, 0, 1))
for _ in batches:
    pass
"""


@pytest.mark.slow
def test_a_run_recovers_from_a_cache_write_killed_mid_pass(image_dir, tmp_path):
    config = checks.resolve(config_lib.override(experiments.preset("smoke"), {
        "image_dir": image_dir, "image_size": 16, "val_fraction": 0.25, "cache": "file",
        "wrn_width": 1, "batch_size": 7, "epochs": 1, "precision": "float32",
        "jit_compile": "false", "export": False, "workdir": str(tmp_path / "run")}))
    (tmp_path / "config.json").write_text(config_lib.to_json(config))
    started = tmp_path / "writing"
    child = subprocess.Popen([sys.executable, "-c", WRITER_KILLED_MID_PASS,
                              str(tmp_path / "config.json"), str(started)])
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    cache_dir = tmp_path / "run" / cache.WORKDIR_CACHE
    (stale,) = entries(cache_dir)
    assert ".tmp-" in stale and "cache_0.lockfile" in os.listdir(cache_dir / stale)

    summary = train.train_and_evaluate(config)
    assert summary["epochs_completed"] == 1
    source = pipeline.choose_cache(sources.create_data_source(config.data, 0),
                                   cache_dir=str(cache_dir))
    assert entries(cache_dir) == [f"train-0of1-{source.fingerprint}", f"val-{source.fingerprint}"]


def test_preview_shows_training_images():
    source = sources.create_data_source(DataConfig(dataset="synthetic", synthetic_examples=20, image_size=16), 0)
    preview = pipeline.preview(source, 8)
    assert preview.shape == (8, 16, 16, 3) and preview.dtype == tf.uint8


def test_offline_download_fails_fast_naming_the_way_out(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # nothing prepared there

    def no_dns(*_):
        raise OSError("Name or service not known")

    monkeypatch.setattr(sources.socket, "getaddrinfo", no_dns)
    assert not sources.host_resolves("https://www.tensorflow.org/datasets")
    with pytest.raises(UserError, match="looks offline.*--data_dir.*--image_dir"):
        sources.create_data_source(DataConfig(dataset="tf_flowers"), 0)


Memory = collections.namedtuple("Memory", "available")
DiskUsage = collections.namedtuple("DiskUsage", "total used free")


@pytest.fixture
def memory(monkeypatch, tmp_path):
    """Sets the available memory psutil reports (no container limit on top)."""
    monkeypatch.setattr(cache, "CGROUP_ROOT", str(tmp_path / "no cgroup"))

    def set_available(available_bytes):
        monkeypatch.setattr(cache.psutil, "virtual_memory", lambda: Memory(available_bytes))
    return set_available


def test_auto_cache_is_memory_when_the_images_fit_else_files_else_none(
        image_dir, tmp_path, memory, monkeypatch, caplog):
    # 18 images of 16 x 16 x 3 bytes: about 14 kB decoded.
    caplog.set_level("INFO", logger="absl")
    cache_dir = str(tmp_path / "cache")
    memory(10**9)
    source = pipeline.choose_cache(sources.create_data_source(folder_config(image_dir), 0),
                                   cache_dir=cache_dir)
    assert source.cache.mode == "memory"
    assert "Cache: memory (--cache=auto: the decoded images take 0.014 MB; 50% of the " \
           "available memory is 500 MB)" in caplog.text
    memory(10_000)
    source = pipeline.choose_cache(sources.create_data_source(folder_config(image_dir), 0),
                                   cache_dir=cache_dir)
    assert (source.cache.mode, source.cache.directory) == ("file", cache_dir)
    assert "50% of the available memory is 0.005 MB; 50% of the free disk space" in caplog.text
    assert sum(int(x.shape[0]) for x, _ in pipeline.create_dataset(source, "val", 4)) == 4
    assert entries(cache_dir) == [f"val-{source.fingerprint}"]
    no_workdir = pipeline.choose_cache(sources.create_data_source(folder_config(image_dir), 0))
    assert no_workdir.cache.mode == "none"
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: DiskUsage(10**12, 10**12, 20_000))
    source = pipeline.choose_cache(sources.create_data_source(folder_config(image_dir), 0),
                                   cache_dir=cache_dir)
    assert source.cache.mode == "none"
    assert sum(int(x.shape[0]) for x, _ in pipeline.create_dataset(source, "val", 4)) == 4


def test_a_containers_memory_limit_counts_not_the_hosts(image_dir, tmp_path, memory, monkeypatch):
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("30000\n")  # cgroup v2: a 30 kB pod
    (cgroup / "memory.current").write_text("25000\n")
    (cgroup / "memory.stat").write_text("anon 20000\ninactive_file 1000\n")
    memory(10**12)
    monkeypatch.setattr(cache, "CGROUP_ROOT", str(cgroup))
    assert cache.available_memory_bytes() == 6000  # 30000 - 25000 + 1000 reclaimable
    source = pipeline.choose_cache(sources.create_data_source(folder_config(image_dir), 0),
                                   cache_dir=str(tmp_path / "c"))
    assert source.cache.mode == "file"
    (cgroup / "memory.max").write_text("max\n")
    assert cache.available_memory_bytes() == 10**12


def test_explicit_memory_cache_too_large_is_an_error_before_any_decoding(
        image_dir, tmp_path, memory, monkeypatch, capsys):
    memory(10_000)
    decoded = []
    real_decode = decode.decode_image
    monkeypatch.setattr(decode, "decode_image",
                        lambda *args: decoded.append(args) or real_decode(*args))
    code, _, err = run_main([
        "--experiment=smoke", f"--image_dir={image_dir}", "--image_size=16", "--cache=memory",
        "--wrn_width=1", "--precision=float32", "--jit_compile=false",
        f"--workdir={tmp_path / 'run'}"], capsys)
    assert code == 2
    assert "--cache=memory: the decoded images take 0.014 MB; 50% of the available memory " \
           "is 0.005 MB, so they would not fit. Use --cache=file" in err
    assert "--cache=none" in err and "Traceback" not in err
    assert decoded == []  # not even a pipeline was built
    assert not (tmp_path / "run" / cache.WORKDIR_CACHE).exists()


@pytest.mark.parametrize("height, width, image_size, ratio", [
    (3024, 4032, 224, 8),  # a 12 Mpx phone photo: 378 x 504 still covers 224
    (3024, 4032, 512, 4),  # 756 x 1008
    (375, 500, 128, 2),  # tf_flowers-sized: 188 x 250
    (375, 500, 188, 2),  # ceil(375 / 2) = 188: just enough
    (375, 500, 189, 1),
    (100, 80, 128, 1),  # smaller than the input: decoded whole (then enlarged)
    (4000, 300, 64, 4),  # the short side decides: 75 x 1000
])
def test_jpeg_ratio_is_the_largest_dct_scale_that_covers_the_input(height, width, image_size, ratio):
    assert decode.JPEG_RATIOS[int(decode.jpeg_ratio_index(height, width, image_size))] == ratio


def photo_jpeg(width, height, noise=4.0, seed=0):
    """Smooth colour gradients plus sensor-like noise, quality 90: a photo's pixels."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([128 + 100 * np.sin(xx / width * 5 + c) * np.cos(yy / height * 4 + 2 * c)
                       for c in range(3)], -1)
    pixels += np.random.default_rng(seed).normal(0.0, noise, pixels.shape)
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return pixels, out.getvalue()


def test_jpegs_are_decoded_at_the_scale_their_header_allows():
    _, jpeg = photo_jpeg(640, 480)
    for image_size, shape in ((60, (60, 80)), (100, (120, 160)), (200, (240, 320)),
                              (300, (480, 640))):
        assert decode.decode_jpeg_to_size(tf.constant(jpeg), image_size).shape == (*shape, 3)
    png = io.BytesIO()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(png, "PNG")
    assert decode.decode_image(tf.constant(png.getvalue()), 16).shape == (16, 16, 3)


def test_decoding_to_size_keeps_the_quality_of_a_full_decode():
    pixels, jpeg = photo_jpeg(1024, 768)
    to_size = decode.decode_image(tf.constant(jpeg), 96).numpy().astype(float)  # decoded at 1/8
    full = decode.resize(tf.io.decode_jpeg(jpeg, channels=3), 96).numpy().astype(float)
    # The pixels averaged over each output pixel's area: what a perfect downscale gives.
    truth = np.asarray(Image.fromarray(pixels).resize((96, 96), Image.BOX), float)
    assert np.abs(to_size - full).mean() < 3.0  # grey levels
    assert np.abs(to_size - truth).mean() <= np.abs(full - truth).mean()


def test_a_misspelt_cache_mode_is_an_error_not_a_directory():
    with pytest.raises(UserError, match="--cache=memroy is not valid"):
        checks.resolve(config_lib.override(config_lib.Config(), {"cache": "memroy"}))
    resolved = checks.resolve(config_lib.override(config_lib.Config(), {"cache": "./cache"}))
    assert resolved.data.cache == "./cache"


def test_every_dct_scale_decodes_from_the_listings_headers_in_order_with_failures_named(
        tmp_path, caplog):
    """Files of every scale group (four JPEG scales, PNG) decode in their own streams and
    come back in the split's order, each as decoding it alone gives; cut files of two
    groups, one the very last, are left out and named."""
    root = tmp_path / "scales"
    sides = {0: (20, 24), 1: (40, 50), 2: (70, 90), 3: (140, 150)}  # ratio index: (h, w) at 16 px
    rng = np.random.default_rng(0)
    for k in range(24):
        folder = root / CLASSES[k % 2]
        folder.mkdir(parents=True, exist_ok=True)
        height, width = sides[k % 4] if k % 5 else (30, 20)
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{k:02d}.{'jpg' if k % 5 else 'png'}")
    for name in ("01.jpg", "23.jpg"):  # the last of the listing too
        path = root / CLASSES[int(name[:2]) % 2] / name
        data = path.read_bytes()
        path.write_bytes(data[:len(data) * 3 // 4])  # header intact, body cut short
    source = sources.create_data_source(folder_config(str(root), val_fraction=0.5), seed=1)
    examples = [source.example_names[split](k) for split in ("train", "val")
                for k in range(source.sizes[split])]
    assert set(decode.scale_groups(np.concatenate(list(source.jpeg_shapes.values())), 16)) == {
        0, 1, 2, 3, decode.OTHER_FORMATS}

    decoded = []
    for split in ("train", "val"):
        skips = decode.DecodeSkips(source.example_names[split], source.sizes[split])
        positions = np.arange(source.sizes[split])
        decoded += [image.numpy() for image, _ in decode.decode_at_known_scales(
            source.examples_at[split], positions, source.jpeg_shapes[split], 16, skips)]
    good = [name for name in examples if not name.endswith(("01.jpg", "23.jpg"))]
    assert len(decoded) == len(good) == 22
    for image, name in zip(decoded, good):
        with open(name, "rb") as f:
            assert np.array_equal(image, decode.decode_image(tf.constant(f.read()), 16).numpy()), name
    left_out = " ".join(r.getMessage() for r in caplog.records if "cannot decode" in r.getMessage())
    assert "01.jpg" in left_out and "23.jpg" in left_out


def test_a_worker_whose_training_shard_is_empty_reads_nothing(image_dir):
    source = sources.create_data_source(folder_config(image_dir, val_fraction=0.9), seed=0)
    assert source.sizes["train"] == 2
    third = tf.distribute.InputContext(num_input_pipelines=3, input_pipeline_id=2)
    assert list(pipeline.create_dataset(source, "train", 1, third).take(1)) == []
