"""--export_tflite: every mode converts the serving export, int8 keeps the accuracy, trainer.predict
reads the .tflite with the same labels, and a failed conversion keeps the SavedModel."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_main, write_image_folder
from trainer import checks
from trainer import config as config_lib
from trainer import experiments
from trainer import models, predict, tflite, train
from trainer.config import UserError

# Precision pinned: `auto` picks by the host's CPU; the mixed case has its own test.
TINY = {"image_size": 16, "wrn_width": 1, "batch_size": 16, "epochs": 6,
        "learning_rate": 1e-2, "early_stopping_patience": 0, "precision": "float32",
        "jit_compile": "false"}


def tiny_config(workdir, image_dir, **values):
    return checks.resolve(config_lib.override(
        experiments.preset("smoke"),
        {**TINY, "image_dir": str(image_dir), "workdir": str(workdir), **values}))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A small folder of real image files: 3 classes of 40 JPEG and PNG files (36 validated)."""
    return write_image_folder(tmp_path_factory.mktemp("photos"), per_class=40, size=(24, 20))


@pytest.fixture(scope="module")
def int8_run(photos, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "int8"
    summary = train.train_and_evaluate(tiny_config(workdir, photos, export_tflite="int8"))
    return workdir, summary


@pytest.mark.slow
def test_int8_keeps_the_val_accuracy_and_predicts_as_the_saved_model(int8_run, photos):
    workdir, summary = int8_run
    assert summary["final_val_accuracy"] > 0.8  # it learned: the comparison means something
    assert abs(summary["tflite_val_accuracy"] - summary["final_val_accuracy"]) <= 0.05
    files = predict.list_images([photos])
    saved = predict.predict_files(predict.load_classifier(str(workdir / "export")), files, 1)
    lite = predict.load_classifier(str(workdir / "export" / tflite.TFLITE_FILE))
    assert lite.labels == ("cats", "dogs", "owls") and lite.image_size == 16
    quantized = predict.predict_files(lite, files, 1)
    agree = [a["predictions"][0]["label"] == b["predictions"][0]["label"]
             for a, b in zip(saved, quantized)]
    assert np.mean(agree) >= 0.9, np.mean(agree)
    # The command line, as a user runs it.
    result = subprocess.run([sys.executable, "-m", "trainer.predict", "--json",
                             f"--model={workdir}/export/{tflite.TFLITE_FILE}", f"{photos}/owls"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(json.loads(result.stdout)) == 40 and "deprecated" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode, tolerance", [("float32", 1e-5), ("float16", 1e-2),
                                             ("dynamic", 5e-2)])
def test_every_mode_computes_what_the_saved_model_computes(int8_run, mode, tolerance):
    workdir, _ = int8_run
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    serve = tf.saved_model.load(str(workdir / "export")).signatures["serving_default"]
    (expected,) = serve(image=tf.constant(images)).values()
    lite = tflite.TFLiteModel(tflite.convert(str(workdir / "export"), mode))
    np.testing.assert_allclose(lite.predict(images), expected.numpy(), atol=tolerance)


def test_a_failed_conversion_names_the_flag_and_keeps_the_saved_model(tmp_path, capsys,
                                                                       monkeypatch):
    class Broken:
        def convert(self):
            raise RuntimeError("op Foo is neither a custom op nor a flex op")

    monkeypatch.setattr(tflite, "converter_for", lambda *args: Broken())
    flags = ["--experiment=smoke", f"--workdir={tmp_path}/run", "--synthetic_examples=40",
             *[f"{config_lib.flag(k)}={v}" for k, v in TINY.items()], "--epochs=1"]
    code, _, err = run_main([*flags, "--export_tflite=float16"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "--export_tflite=float16 could not convert the model (RuntimeError: op Foo" in err
    assert (tmp_path / "run" / "export" / "saved_model.pb").exists()
    assert not (tmp_path / "run" / "summary.json").exists()
    # The export mode may change between attempts: the run finishes without it.
    code, _, err = run_main([*flags, "--export_tflite=none"], capsys)
    assert code == 0, err[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tflite_val_accuracy"] is None and summary["epochs_completed"] == 1


@pytest.mark.slow
def test_a_mixed_precision_run_converts_its_weights_rebuilt_in_float32(tmp_path, photos):
    workdir = tmp_path / "run"
    config = tiny_config(workdir, photos, precision="mixed_bfloat16", epochs=1,
                         export_tflite="float32")
    summary = train.train_and_evaluate(config)
    assert summary["precision"] == "mixed_bfloat16" and summary["tflite_val_accuracy"] is not None
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    float32_model = models.create_model(config.model, 3, 16)
    float32_model.load_weights(str(workdir / "checkpoints" / "best" / "weights")).expect_partial()
    lite = tflite.load(str(workdir / "export" / tflite.TFLITE_FILE))
    np.testing.assert_allclose(lite.predict(images), float32_model(images).numpy(), atol=1e-5)
    assert not list(tmp_path.glob("run/*.tmp-*"))


def test_predict_refuses_a_tflite_file_it_cannot_use(tmp_path):
    (tmp_path / "model.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises(UserError, match="has no labels.txt beside it"):
        predict.load_classifier(str(tmp_path / "model.tflite"))
    (tmp_path / "labels.txt").write_text("a\nb\n")
    with pytest.raises(UserError, match=f"--model={tmp_path}/model.tflite is not a TFLite"):
        predict.load_classifier(str(tmp_path / "model.tflite"))


@pytest.mark.slow
def test_predict_refuses_a_tflite_file_whose_labels_do_not_match(int8_run, tmp_path):
    workdir, _ = int8_run
    (tmp_path / "model.tflite").write_bytes((workdir / "export" / tflite.TFLITE_FILE).read_bytes())
    (tmp_path / "labels.txt").write_text("a\nb\n")
    with pytest.raises(UserError, match="gives 3 class probabilities, but labels.txt"):
        predict.load_classifier(str(tmp_path / "model.tflite"))
