"""Bad input gets a clear error or is skipped with a count: image files, flags, hub models, TF_CONFIG."""

import io
import json
import os
import string
import struct

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from trainer import backbones
from trainer import config as config_lib
from trainer import experiments
from trainer import main, models
from trainer.config import DataConfig, ModelConfig, UserError
from trainer.data import decode, folders, sources

from conftest import run_main


def noise(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def jpeg_bytes(pixels):
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


# What phones append after a JPEG's end marker: a Motion Photo's MP4 (an ftyp box,
# then the video's mdat box) and a Samsung SEF trailer (data, directory, "SEFT").
MP4_VIDEO = (struct.pack(">I", 24) + b"ftypmp42" + struct.pack(">I", 0) + b"isommp42"
             + struct.pack(">I", 4104) + b"mdat" + bytes(range(256)) * 16)
SEF_TRAILER = (b"\x00\x00\x01\x0aImage_UTC_Data1700000000000" + b"SEFH"
               + struct.pack("<III", 106, 1, 0x0a01) + struct.pack("<II", 44, 31)
               + struct.pack("<I", 60) + b"SEFT")


def phone_photos(folder, seed=0):
    """A Motion Photo, a JPEG with a SEF trailer and a truncated JPEG; returns the
    plain JPEG the first two carry."""
    plain = jpeg_bytes(noise(48, 64, seed))
    (folder / "motion photo.jpg").write_bytes(plain + MP4_VIDEO)
    (folder / "samsung.jpg").write_bytes(plain + SEF_TRAILER)
    (folder / "truncated.jpg").write_bytes(plain[: len(plain) // 2])
    return plain


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


def decoded_once(source, split):
    """Images of one pass over a split, as training reads them (no repeat)."""
    skips = decode.DecodeSkips(source.example_names[split], source.sizes[split])
    return [x.numpy() for x, _ in decode.decode_examples(source.examples[split](), 16,
                                                         source.encoded, skips)]


def test_messy_folder_keeps_every_decodable_image_and_skips_the_rest(messy_folder, caplog):
    root, usable = messy_folder
    source = sources.create_data_source(DataConfig(image_dir=root, image_size=16, val_fraction=0.25), seed=0)
    assert source.class_names == ("good kind", "ünïcode")
    assert "Skipped 3 of 12" in caplog.text  # empty, text, bomb: told by their headers
    assert "bomb.png (8000x8000 is more than" in caplog.text
    assert "empty class has no usable images" in caplog.text
    # The truncated JPEG's header is fine: TensorFlow's decoder leaves it out.
    assert sum(source.sizes.values()) == usable + 1
    assert len(decoded_once(source, "train")) + len(decoded_once(source, "val")) == usable
    left_out = " ".join(r.getMessage() for r in caplog.records if "cannot decode" in r.getMessage())
    assert "truncated.jpg" in left_out


def test_phone_photos_with_data_after_the_jpeg_are_trained_on(tmp_path, caplog):
    folder = tmp_path / "phone"
    for label, name in enumerate(("a", "b")):
        (folder / name).mkdir(parents=True)
        plain = phone_photos(folder / name, seed=label)
    paths, _, _ = folders.list_image_folder(str(folder))
    assert sorted(os.path.basename(p) for p in paths) == sorted(
        ["motion photo.jpg", "samsung.jpg", "truncated.jpg"] * 2)
    source = sources.create_data_source(DataConfig(image_dir=str(folder), image_size=16,
                                                   val_fraction=0.5), seed=0)
    images = decoded_once(source, "train") + decoded_once(source, "val")
    assert len(images) == 4  # the truncated ones are left out, by name
    left_out = " ".join(r.getMessage() for r in caplog.records if "cannot decode" in r.getMessage())
    assert all(str(folder / name / "truncated.jpg") in left_out for name in ("a", "b"))
    expected = decode.decode_image(tf.constant(plain), 16).numpy()
    assert sum(np.array_equal(image, expected) for image in images) == 2  # b's, with trailers


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
    st.sampled_from([*backbones.names(), *experiments.PRESETS, *config_lib.PRECISIONS,
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


def test_undecodable_examples_are_named_once_first_middle_and_last(caplog):
    good = jpeg_bytes(noise(20, 24))
    encoded = [good[:40], good, good[:-200], good, b"\xff\xd8\xff broken"]  # 0, 2 and 4 fail
    names = [f"file{k}.jpg" for k in range(5)]
    skips = decode.DecodeSkips(names.__getitem__, len(names))
    examples = tf.data.Dataset.from_tensor_slices((encoded, tf.range(5, dtype=tf.int64)))
    pipeline = decode.decode_examples(examples, 16, encoded=True, skips=skips)
    for _ in range(2):  # no cache: every pass decodes again, the log names them once
        assert [int(label) for _, label in pipeline] == [1, 3]
    warnings = [r.getMessage() for r in caplog.records if "cannot decode" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("Left out 3 of 5 images that TensorFlow cannot decode")
    assert warnings[0].endswith(": file0.jpg; file2.jpg; file4.jpg")
