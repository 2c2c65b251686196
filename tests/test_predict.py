"""trainer.predict on a tiny real run's export: top-k, bad files by name, JSON, exit codes."""

import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer import checks
from trainer import config as config_lib
from trainer import experiments
from trainer import predict, train
from trainer.config import UserError
from trainer.data import decode, folders

from test_bad_input import MP4_VIDEO, SEF_TRAILER, jpeg_bytes

CLASSES = ("blue", "green", "red")  # sorted, as the trainer orders class folders


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An image folder, one colour per class, JPEG and PNG of several sizes."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        os.makedirs(root / name)
        for i in range(8):
            pixels = rng.integers(0, 60, (20 + i, 24, 3)).astype(np.uint8)
            pixels[..., 2 - label] += 180  # blue, green, red
            Image.fromarray(pixels).save(root / name / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


@pytest.fixture(scope="module")
def export_dir(photos, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "colours"
    train.train_and_evaluate(checks.resolve(config_lib.override(
        experiments.preset("smoke"),
        {"image_dir": str(photos), "image_size": 16, "wrn_width": 1, "batch_size": 8,
         "epochs": 1, "workdir": str(workdir)})))
    return str(workdir / "export")


@pytest.fixture(scope="module")
def classifier(export_dir):
    return predict.load_classifier(export_dir)


def png_header(width, height):
    """A tiny PNG file whose header announces width x height pixels (a decompression bomb)."""
    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bad_files(photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    files = {
        "empty.jpg": b"",
        "notes.png": b"this is not an image",
        "bomb.png": png_header(8_000, 8_000),
    }
    whole = jpeg_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    files["truncated.jpg"] = whole[: len(whole) * 3 // 4]  # header intact, scan lines cut
    for name, content in files.items():
        (root / name).write_bytes(content)
    return root


def test_loads_labels_and_input_size(classifier):
    assert classifier.labels == CLASSES
    assert classifier.image_size == 16


def test_top_k_are_the_models_probabilities_in_order(classifier, export_dir, photos):
    files = [str(photos / name / "3.jpg") for name in CLASSES] + [str(photos / "blue" / "2.png")]
    results = predict.predict_files(classifier, files, top_k=3)

    serving = tf.saved_model.load(export_dir).signatures["serving_default"]
    for path, result in zip(files, results):
        assert result["file"] == path and "error" not in result
        image = decode.decode_image(tf.io.read_file(path), 16)
        (expected,) = serving(image=image[None]).values()
        by_label = {p["label"]: p["probability"] for p in result["predictions"]}
        assert set(by_label) == set(CLASSES)
        np.testing.assert_allclose([by_label[c] for c in CLASSES], expected.numpy()[0], rtol=1e-5)
        probabilities = [p["probability"] for p in result["predictions"]]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    assert [len(r["predictions"]) for r in predict.predict_files(classifier, files, 1)] == [1] * 4


def test_bad_files_are_named_and_the_rest_still_predicted(classifier, photos, bad_files):
    good = str(photos / "green" / "0.png")
    files = [str(bad_files / "empty.jpg"), good, str(bad_files / "notes.png"),
             str(bad_files / "bomb.png"), str(bad_files / "truncated.jpg"),
             str(bad_files / "missing.jpg"), good]
    results = predict.predict_files(classifier, files, top_k=2)

    assert [r["file"] for r in results] == files
    errors = {os.path.basename(r["file"]): r["error"] for r in results if "error" in r}
    assert errors.pop("truncated.jpg").startswith("cannot be decoded (")  # TensorFlow's verdict
    assert errors == {
        "empty.jpg": "empty file",
        "notes.png": "not an image (UnidentifiedImageError)",
        "bomb.png": f"8000x8000 is more than {folders.MAX_IMAGE_PIXELS} pixels",
        "missing.jpg": "no such file",
    }
    assert results[1]["predictions"] == results[6]["predictions"]
    assert len(results[1]["predictions"]) == 2


def test_phone_photos_with_data_after_the_jpeg_are_predicted(classifier, photos, tmp_path):
    plain = (photos / "red" / "3.jpg").read_bytes()
    (tmp_path / "motion.jpg").write_bytes(plain + MP4_VIDEO)
    (tmp_path / "samsung.jpg").write_bytes(plain + SEF_TRAILER)
    files = [str(photos / "red" / "3.jpg"), str(tmp_path / "motion.jpg"), str(tmp_path / "samsung.jpg")]
    results = predict.predict_files(classifier, files, top_k=3)
    assert all("error" not in r for r in results)
    assert results[0]["predictions"] == results[1]["predictions"] == results[2]["predictions"]


def test_directories_are_listed_recursively_without_hidden_or_other_files(photos, tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.PNG", "a.jpg", ".hidden.jpg", "readme.txt", "sub/c.jpeg"):
        (tmp_path / name).write_bytes(b"")
    assert predict.list_images([str(tmp_path), "x.gif"]) == [
        str(tmp_path / "a.jpg"), str(tmp_path / "b.PNG"), str(tmp_path / "sub" / "c.jpeg"), "x.gif"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "trainer.predict", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_text_reports_bad_files_and_exits_1(export_dir, photos, bad_files):
    result = run_cli(f"--model={export_dir}", "--top_k=2", str(photos / "red"),
                     str(bad_files / "notes.png"))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 8  # every image of the red folder
    label, probability = lines[0].split(": ", 1)[1].split(", ")[0].split()
    assert label in CLASSES and 0.0 < float(probability) <= 1.0
    assert f"error: {bad_files / 'notes.png'}: not an image" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_json_includes_bad_files(export_dir, photos, bad_files):
    files = [str(photos / "blue" / "0.png"), str(bad_files / "bomb.png"), str(photos / "green" / "1.jpg")]
    result = run_cli(f"--model={export_dir}", "--json", "--top_k=5", *files)
    assert result.returncode == 1
    results = json.loads(result.stdout)
    assert [r["file"] for r in results] == files
    assert results[1] == {"file": files[1],
                          "error": f"8000x8000 is more than {folders.MAX_IMAGE_PIXELS} pixels"}
    assert [len(r["predictions"]) for r in (results[0], results[2])] == [3, 3]  # capped at 3 classes


def test_a_directory_that_is_not_an_export_is_refused(photos):
    with pytest.raises(UserError, match=f"--model={photos} is not an exported model"):
        predict.load_classifier(str(photos))
