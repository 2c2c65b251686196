"""Config presets, overrides, resolution and checks (no TensorFlow needed)."""

import pytest

from trainer import config as config_lib
from trainer.config import UserError


def test_presets_carry_the_reference_hyperparameters():
    finetune = config_lib.resolve(config_lib.preset("bit_finetune"))
    assert finetune.model.backbone == "bit" and finetune.model.bit_variant == "s-r50x3"
    assert finetune.model.trainable is True
    assert finetune.train.learning_rate == 1e-5
    assert finetune.data.global_batch_size == 16 and finetune.data.image_size == 224
    assert finetune.train.epochs == 20 and finetune.train.early_stopping_patience == 2
    scratch = config_lib.resolve(config_lib.preset("resnet50_scratch"))
    assert (scratch.model.weights, scratch.model.trainable, scratch.train.learning_rate) == (
        "none", True, 1e-4)
    transfer = config_lib.resolve(config_lib.preset("resnet50_hub_transfer"))
    assert transfer.model.trainable is False and transfer.train.learning_rate == 1e-3


def test_every_preset_resolves_and_names_its_workdir():
    for name in config_lib.PRESETS:
        resolved = config_lib.resolve(config_lib.preset(name))
        assert resolved.experiment == name
        assert resolved.workdir == f"runs/{name}"


def test_explicit_values_override_the_preset():
    base = config_lib.preset("smoke")
    changed = config_lib.override(base, {"epochs": 7, "batch_size": 8, "image_size": 16})
    assert changed.train.epochs == 7
    assert changed.data.global_batch_size == 8
    assert changed.data.image_size == 16
    assert changed.model.backbone == "wide_resnet"  # untouched preset value


def test_trainable_and_learning_rate_defaults_follow_the_backbone():
    random_init = config_lib.resolve(config_lib.override(config_lib.Config(), {"backbone": "wide_resnet"}))
    assert random_init.model.trainable is True and random_init.train.learning_rate == 1e-3
    pretrained = config_lib.resolve(config_lib.Config())
    assert pretrained.model.trainable is False and pretrained.train.learning_rate == 1e-3
    fine_tune = config_lib.resolve(config_lib.override(config_lib.Config(), {"trainable": True}))
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
        config_lib.resolve(config_lib.override(config_lib.Config(), values))


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(UserError, match="smoke"):
        config_lib.preset("nope")


def test_json_round_trip_and_differences():
    resolved = config_lib.resolve(config_lib.preset("smoke"))
    assert config_lib.from_json(config_lib.to_json(resolved)) == resolved
    other = config_lib.override(resolved, {"epochs": 9, "batch_size": 4})
    assert sorted(config_lib.differences(resolved, other)) == ["--batch_size", "--epochs"]


def test_batch_norm_momentum_defaults_to_short_runs_for_statistics_learned_from_scratch():
    def momentum(**values):
        return config_lib.resolve(config_lib.override(config_lib.Config(), values)).model.batch_norm_momentum

    assert momentum(backbone="wide_resnet") == config_lib.SCRATCH_BATCH_NORM_MOMENTUM == 0.9
    assert momentum(backbone="resnet50", weights="none") == 0.9
    assert momentum(backbone="wide_resnet", batch_norm_momentum=0.5) == 0.5
    # Pretrained statistics: kept fixed (nothing to set), or updated at Keras' own rate.
    assert momentum(backbone="resnet50", trainable=True) is None
    assert momentum(backbone="resnet50", trainable=True, freeze_batch_norm=False) == 0.99
    assert momentum(backbone="resnet50_hub", trainable=True, freeze_batch_norm=False) is None
    assert momentum(backbone="bit") is None
