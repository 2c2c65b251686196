"""Bad input gets a clear error or is skipped with a count: image files, flags, hub models, TF_CONFIG."""

import json
import string

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from trainer import config as config_lib
from trainer import data, main, models
from trainer.config import DataConfig, ModelConfig, UserError

from conftest import run_main


def noise(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def messy_folder(tmp_path):
    """Every kind of file users drop into image folders, and how many are usable."""
    root = tmp_path / "messy"
    good, bad = root / "good kind", root / "ünïcode"
    for folder in (good, bad, root / "empty class"):
        folder.mkdir(parents=True)
    Image.fromarray(noise(30, 40)).convert("L").save(good / "grayscale.jpg")
    Image.fromarray(noise(30, 40)).convert("CMYK").save(good / "cmyk.jpg")
    Image.fromarray((noise(30, 40)[..., 0].astype(np.uint16) * 257)).save(good / "sixteen bit.png")
    Image.fromarray(noise(30, 40)).convert("RGBA").save(good / "alpha.png")
    frames = [Image.fromarray(noise(30, 40, seed)) for seed in range(2)]
    frames[0].save(good / "animated.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(noise(30, 40)).save(good / "plain.bmp")
    Image.fromarray(noise(30, 40)).save(bad / "fleur été n°1.jpg")
    Image.fromarray(noise(30, 40)).save(bad / "with spaces.png")
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "readme.jpg").write_text("this is not an image")
    Image.fromarray(noise(300, 400)).save(bad / "truncated.jpg")
    full = (bad / "truncated.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(full[: len(full) * 3 // 4])
    # A decompression bomb: 8000 x 8000 pixels in a few kilobytes.
    Image.new("1", (8000, 8000)).save(bad / "bomb.png")
    (bad / ".DS_Store").write_bytes(b"\0\1")
    (bad / ".hidden.jpg").write_bytes(b"")
    (root / "empty class" / "notes.txt").write_text("no images here")
    return str(root), 8  # 6 in "good kind", 2 in "ünïcode"


def test_messy_folder_keeps_every_decodable_image_and_skips_the_rest(messy_folder, caplog):
    root, usable = messy_folder
    source = data.create_data_source(DataConfig(image_dir=root, image_size=16, val_fraction=0.25), seed=0)
    assert source.class_names == ("good kind", "ünïcode")
    assert sum(source.sizes.values()) == usable
    assert "Skipped 4 of 12" in caplog.text  # empty, text, truncated, bomb
    assert "bomb.png (8000x8000 is more than" in caplog.text
    assert "empty class has no usable images" in caplog.text
    # Every listed file really decodes: the pipeline's safety net drops nothing.
    assert sum(int(images.shape[0]) for images, _ in source.dataset("val", 3)) == source.sizes["val"]
    train_once = source._decoded(source.examples["train"](), 16)  # one pass, before repeat()
    assert sum(1 for _ in train_once) == source.sizes["train"]


def save_spatial_model(path):
    inputs = keras.Input((None, None, 3))
    tf.saved_model.save(keras.Model(inputs, keras.layers.Conv2D(2, 3)(inputs)), str(path))
    return str(path)


def test_hub_model_that_is_not_a_feature_vector_is_a_clear_error(tmp_path):
    handle = save_spatial_model(tmp_path / "spatial")
    with pytest.raises(UserError, match="not a feature vector"):
        models.create_model(ModelConfig(backbone="hub", hub_handle=handle, trainable=False), 3, 16)


@pytest.mark.parametrize("tf_config, message", [
    ("{oops", "malformed"),
    (json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:1"]},
                 "task": {"type": "worker", "index": 0}}), "twice"),
    (json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}),
     "out of range"),
])
def test_bad_tf_config_stops_the_command_before_any_collective(tf_config, message, monkeypatch,
                                                                capsys, tmp_path):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    code, _, err = run_main(["--experiment=smoke", "--strategy=multi_worker",
                             f"--workdir={tmp_path / 'run'}"], capsys)
    assert code == 2 and "TF_CONFIG" in err and message in err
    assert not (tmp_path / "run").exists()


FLAG_NAMES = sorted(set(main.CONFIG_FLAGS) - {"global_batch_size", "workdir"}) + ["no_such_flag"]
VALUES = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + " -_./:=,", max_size=12),
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["true", "false", "", "none", "1e-3", "0", "-1", "nan", "inf"]),
    st.sampled_from([*config_lib.BACKBONES, *config_lib.PRESETS, *config_lib.PRECISIONS,
                     *config_lib.STRATEGIES]),
)
FLAG_ARGS = st.lists(
    st.one_of(st.tuples(st.sampled_from(FLAG_NAMES), VALUES).map(lambda nv: f"--{nv[0]}={nv[1]}"),
              st.sampled_from(FLAG_NAMES).map(lambda n: f"--no{n}"),
              st.sampled_from(FLAG_NAMES).map(lambda n: f"--{n}")),
    max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=FLAG_ARGS)
def test_no_flag_combination_produces_a_traceback(argv, capsys, tmp_path):
    code, out, err = run_main(argv + [f"--workdir={tmp_path / 'run'}", "--print_config"], capsys)
    assert "Traceback" not in err
    if code == 0:
        json.loads(out)  # a usable configuration
    else:
        assert code == 2
        assert err.startswith("error: ") and err.strip().count("\n") == 0, err
