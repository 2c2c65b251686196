"""The backbone registry: specs load without TensorFlow; a new backbone is a module and a line."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_main
from trainer import backbones, compare, export
from trainer import checks
from trainer import config as config_lib
from trainer.config import UserError

NO_TENSORFLOW = """
import sys
import trainer.checks, trainer.config, trainer.backbones, trainer.backbones.bit_weights
from trainer import backbones
config = trainer.checks.resolve(trainer.config.Config())
for spec in backbones.specs():
    model = trainer.config.override(config, {"backbone": spec.name}).model
    spec.check_fields(model)
    spec.pretrained(model)
    spec.weights({"backbone": spec.name, "bit_variant": "s-r50x1", "weights": "imagenet"})
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras", "keras",
                                                              "tensorflow_hub"))
assert not loaded, loaded
print(len(backbones.specs()))
"""


def test_the_registry_and_every_spec_load_without_tensorflow():
    result = subprocess.run([sys.executable, "-c", NO_TENSORFLOW], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout) == len(backbones.MODULES) + 1  # hub.py declares two


def test_names_are_unique_and_each_spec_is_found_by_its_name():
    names = backbones.names()
    assert len(set(names)) == len(names)
    assert {"resnet50", "resnet50_hub", "hub", "bit", "wide_resnet"} == set(names)
    for name in names:
        assert backbones.spec(name).name == name and backbones.spec(name).description
    with pytest.raises(KeyError):
        backbones.spec("vgg")


@pytest.fixture
def toy(monkeypatch):
    """The one line that registers a backbone (tests/ is on sys.path)."""
    monkeypatch.setattr(backbones, "MODULES", backbones.MODULES + ("toy_backbone",))


def resolved(**values):
    return checks.resolve(config_lib.override(config_lib.Config(), values))


def test_a_registered_toy_backbone_is_checked_like_any_other(toy):
    config = resolved(backbone="toy")
    assert config.model.trainable is True and config.train.learning_rate == 1e-3  # not pretrained
    with pytest.raises(UserError, match="--backbone=vgg is not valid; choose one of .*toy"):
        resolved(backbone="vgg")
    with pytest.raises(UserError, match="--bit_weights applies to --backbone=bit, not --backbone=toy"):
        resolved(backbone="toy", bit_weights="none")
    with pytest.raises(UserError, match="--batch_norm_momentum applies to .* not --backbone=toy"):
        resolved(backbone="toy", batch_norm_momentum=0.9)
    with pytest.raises(UserError, match="--notrainable would freeze .*--backbone=toy"):
        resolved(backbone="toy", trainable=False)


def test_a_registered_toy_backbone_trains_exports_and_compares(toy, tmp_path, capsys):
    workdir = tmp_path / "toy"
    code, _, err = run_main(["--backbone=toy", "--dataset=synthetic", "--synthetic_examples=40",
                             "--image_size=16", "--epochs=1", "--batch_size=8",
                             "--precision=float32", "--jit_compile=false",
                             f"--workdir={workdir}"], capsys)
    assert code == 0, err
    serve = tf.saved_model.load(str(workdir / export.EXPORT_DIR)).signatures["serving_default"]
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    (probabilities,) = serve(image=tf.constant(images)).values()
    np.testing.assert_allclose(probabilities.numpy().sum(axis=1), 1.0, rtol=1e-5)
    (row,) = compare.compare([str(workdir)], str(tmp_path / "report"), hparams=False)
    assert (row["backbone"], row["weights"], row["status"]) == ("toy", "toy (random)", "complete")
    assert os.path.isfile(tmp_path / "report" / "report.md")
