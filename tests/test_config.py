"""Config presets, overrides, resolution and checks (no TensorFlow needed)."""

import pytest

from trainer import checks
from trainer import config as config_lib
from trainer import experiments
from trainer import workdir as workdir_lib
from trainer.config import UserError


def test_presets_carry_the_reference_hyperparameters():
    finetune = checks.resolve(experiments.preset("bit_finetune"))
    assert finetune.model.backbone == "bit" and finetune.model.bit_variant == "s-r50x3"
    assert finetune.model.trainable is True
    assert finetune.train.learning_rate == 1e-5
    assert finetune.data.global_batch_size == 16 and finetune.data.image_size == 224
    assert finetune.train.epochs == 20 and finetune.train.early_stopping_patience == 2
    scratch = checks.resolve(experiments.preset("resnet50_scratch"))
    assert (scratch.model.weights, scratch.model.trainable, scratch.train.learning_rate) == (
        "none", True, 1e-4)
    transfer = checks.resolve(experiments.preset("resnet50_hub_transfer"))
    assert transfer.model.trainable is False and transfer.train.learning_rate == 1e-3


def test_every_preset_resolves_and_names_its_workdir():
    for name in experiments.PRESETS:
        resolved = checks.resolve(experiments.preset(name))
        assert resolved.experiment == name
        assert resolved.workdir == f"runs/{name}"


def test_explicit_values_override_the_preset():
    base = experiments.preset("smoke")
    changed = config_lib.override(base, {"epochs": 7, "batch_size": 8, "image_size": 16})
    assert changed.train.epochs == 7
    assert changed.data.global_batch_size == 8
    assert changed.data.image_size == 16
    assert changed.model.backbone == "wide_resnet"  # untouched preset value


def test_trainable_and_learning_rate_defaults_follow_the_backbone():
    random_init = checks.resolve(config_lib.override(config_lib.Config(), {"backbone": "wide_resnet"}))
    assert random_init.model.trainable is True and random_init.train.learning_rate == 1e-3
    pretrained = checks.resolve(config_lib.Config())
    assert pretrained.model.trainable is False and pretrained.train.learning_rate == 1e-3
    fine_tune = checks.resolve(config_lib.override(config_lib.Config(), {"trainable": True}))
    assert fine_tune.train.learning_rate == 1e-5


@pytest.mark.parametrize("values, flag", [
    ({"backbone": "vgg"}, "--backbone"),
    ({"val_fraction": 1.0}, "--val_fraction"),
    ({"batch_size": 0}, "--batch_size"),
    ({"wrn_depth": 12}, "--wrn_depth"),
    ({"backbone": "wide_resnet", "trainable": False}, "--notrainable"),
    ({"backbone": "resnet50", "weights": "none", "trainable": False}, "--notrainable"),
    ({"backbone": "hub"}, "--hub_handle"),
    ({"backbone": "wide_resnet", "hub_handle": "/x"}, "--hub_handle"),
    ({"strategy": "tpu"}, "--tpu"),
    ({"learning_rate": -1.0}, "--learning_rate"),
    ({"backbone": "resnet50", "image_size": 16}, "--image_size"),
    ({"backbone": "wide_resnet", "batch_norm_momentum": 1.0}, "--batch_norm_momentum"),
    ({"backbone": "bit", "batch_norm_momentum": 0.9}, "--batch_norm_momentum"),  # a hub model
    ({"backbone": "resnet50", "trainable": True, "batch_norm_momentum": 0.9}, "--batch_norm_momentum"),
])
def test_bad_values_name_their_flag(values, flag):
    with pytest.raises(UserError, match=flag):
        checks.resolve(config_lib.override(config_lib.Config(), values))


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(UserError, match="smoke"):
        experiments.preset("nope")


def test_json_round_trip():
    resolved = checks.resolve(experiments.preset("smoke"))
    assert config_lib.from_json(config_lib.to_json(resolved)) == resolved


# Each setting that changes results, with another value: a resume compares them.
RESULT_SETTINGS = {
    "seed": 1, "dataset": "mnist", "data_dir": "/data", "image_dir": "/photos", "val_fraction": 0.5,
    "image_size": 16, "batch_size": 4, "augment": "flip_crop", "synthetic_examples": 50,
    "backbone": "resnet50", "weights": "none", "hub_handle": "/hub", "bit_variant": "m-r50x1",
    "bit_weights": "none", "trainable": False, "freeze_batch_norm": False, "wrn_depth": 16,
    "wrn_width": 1, "dropout_rate": 0.0, "batch_norm_momentum": 0.5, "optimizer": "sgd",
    "learning_rate": 0.5, "schedule": "bit_hyperrule", "total_steps": 1000, "mixup_alpha": 0.2,
    "resize_size": 40, "examples_per_class": 5, "label_smoothing": 0.1, "ema_decay": 0.99,
}
# Each setting that may change between attempts at one run, with another value.
ATTEMPT_SETTINGS = {
    "experiment": None, "workdir": "elsewhere", "cache": "none", "epochs": 9,
    "early_stopping_patience": 5, "precision": "mixed_bfloat16", "strategy": "mirrored", "tpu": "t",
    "collective_timeout_sec": 30, "steps_per_execution": 4, "jit_compile": "true",
    "export": False, "export_backbone": True, "export_tflite": "int8",
    "gradient_accumulation_steps": 4, "micro_batch_size": 16,
}


def test_every_setting_is_either_compared_on_resume_or_may_change_between_attempts():
    fields = set(config_lib.flatten(config_lib.Config())) - {"global_batch_size"} | {"batch_size"}
    assert set(RESULT_SETTINGS) | set(ATTEMPT_SETTINGS) == fields
    resolved = checks.resolve(experiments.preset("smoke"))
    for name, value in RESULT_SETTINGS.items():
        other = config_lib.override(resolved, {name: value})
        assert workdir_lib.differences(resolved, other) == [f"--{name}"], name
    attempt = config_lib.override(resolved, ATTEMPT_SETTINGS)
    assert workdir_lib.differences(resolved, attempt) == []
    # Under BiT-HyperRule --epochs splits the run's fixed steps: another value is another run.
    rule = config_lib.override(resolved, {"schedule": "bit_hyperrule"})
    assert workdir_lib.differences(rule, config_lib.override(rule, {"epochs": 5})) == ["--epochs"]
    changes = workdir_lib.attempt_changes(resolved, attempt)
    assert len(changes) == len(ATTEMPT_SETTINGS) and "--strategy: auto -> mirrored" in changes


def test_local_paths_are_normalised_so_two_spellings_of_a_run_are_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def resolved(**values):
        return checks.resolve(config_lib.override(config_lib.Config(), values))

    a = resolved(workdir="runs/x/", image_dir="./photos/", data_dir="tfds", backbone="hub",
                 hub_handle="models//fv")
    b = resolved(workdir="runs/x", image_dir=str(tmp_path / "photos"), data_dir=str(tmp_path / "tfds"),
                 backbone="hub", hub_handle=str(tmp_path / "models" / "fv"))
    assert a == b
    assert a.workdir == "runs/x" and a.data.image_dir == str(tmp_path / "photos")
    assert resolved(backbone="resnet50", weights="w.h5").model.weights == str(tmp_path / "w.h5")
    assert resolved(backbone="bit", bit_weights="r50.npz").model.bit_weights == str(tmp_path / "r50.npz")
    # URLs and keywords are not paths.
    url = resolved(backbone="hub", hub_handle="https://tfhub.dev/google/bit/s-r50x1/1",
                   data_dir="gs://bucket/tfds")
    assert (url.model.hub_handle, url.data.data_dir) == ("https://tfhub.dev/google/bit/s-r50x1/1",
                                                         "gs://bucket/tfds")
    remote = "https://storage.googleapis.com/bit_models/BiT-M-R50x1.npz"
    assert resolved(backbone="bit", bit_weights=remote).model.bit_weights == remote
    assert resolved(backbone="bit", bit_weights="none").model.bit_weights == "none"
    assert resolved(backbone="resnet50").model.weights == "imagenet"


def test_batch_norm_momentum_defaults_to_short_runs_for_statistics_learned_from_scratch():
    def momentum(**values):
        return checks.resolve(config_lib.override(config_lib.Config(), values)).model.batch_norm_momentum

    assert momentum(backbone="wide_resnet") == config_lib.SCRATCH_BATCH_NORM_MOMENTUM == 0.9
    assert momentum(backbone="resnet50", weights="none") == 0.9
    assert momentum(backbone="wide_resnet", batch_norm_momentum=0.5) == 0.5
    # Pretrained statistics: kept fixed (nothing to set), or updated at Keras' own rate.
    assert momentum(backbone="resnet50", trainable=True) is None
    assert momentum(backbone="resnet50", trainable=True, freeze_batch_norm=False) == 0.99
    assert momentum(backbone="resnet50_hub", trainable=True, freeze_batch_norm=False) is None
    assert momentum(backbone="bit") is None
