"""Named experiments: the six reference runs, smoke, bit_hyperrule, and what a schedule presets.

  python -m trainer.main --experiment=bit_finetune --workdir=runs/bit_finetune

A preset fills config fields; flags given on the command line override it.
docs/reference.md describes the recipe the six reference presets reproduce.
"""

from __future__ import annotations

from typing import Any, Mapping

from trainer.config import Config, UserError, field_name, override

_FLOWERS = {"dataset": "tf_flowers", "image_size": 224, "global_batch_size": 16, "epochs": 20}

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "dataset": "synthetic", "backbone": "wide_resnet", "image_size": 32,
        "epochs": 2, "global_batch_size": 32, "learning_rate": 2e-3,
        "early_stopping_patience": 0,
    },
    # The six reference runs (docs/reference.md), each with the preprocessing its
    # backbone expects (built into the model).
    "resnet50_scratch": {
        **_FLOWERS, "backbone": "resnet50", "weights": "none", "trainable": True,
        "learning_rate": 1e-4,
    },
    "resnet50_imagenet_finetune": {
        **_FLOWERS, "backbone": "resnet50", "weights": "imagenet", "trainable": True,
        "learning_rate": 1e-4,
    },
    "resnet50_hub_transfer": {
        **_FLOWERS, "backbone": "resnet50_hub", "trainable": False, "learning_rate": 1e-3,
    },
    # The reference fine-tuned at Adam's default 1e-3 and collapsed (0.768);
    # the rate BiT fine-tunes with keeps the pretrained features.
    "resnet50_hub_finetune": {
        **_FLOWERS, "backbone": "resnet50_hub", "trainable": True, "learning_rate": 1e-5,
    },
    # The native BiT (Keras, official .npz weights of BiT-S R50x3, downloaded once;
    # --bit_weights=PATH offline), which the reference ran as a TF Hub model.
    "bit_transfer": {
        **_FLOWERS, "backbone": "bit", "bit_variant": "s-r50x3", "trainable": False,
        "learning_rate": 1e-4,
    },
    "bit_finetune": {
        **_FLOWERS, "backbone": "bit", "bit_variant": "s-r50x3", "trainable": True,
        "learning_rate": 1e-5,
    },
    # BiT's own fine-tuning recipe (SCHEDULE_DEFAULTS, trainer/schedules.py) on
    # tf_flowers, at the authors' batch of 512 (so their rate, 0.003). Each replica
    # computes its share in micro-batches of at most 16 images: at 480 px one image
    # of R50x1 takes about 370 MB in a training step (measured, docs/recipes.md), so
    # 16 fit a 16 GB GPU in any precision; one GPU accumulates 32 of them.
    "bit_hyperrule": {
        "dataset": "tf_flowers", "backbone": "bit", "bit_variant": "m-r50x1",
        "trainable": True, "schedule": "bit_hyperrule", "global_batch_size": 512,
        "micro_batch_size": 16,
    },
}

# What --schedule=bit_hyperrule changes, unless a preset or a flag sets it: the
# rest of BiT-HyperRule (SGD, no early stopping, random resized crops, the
# image size by area and MixUp by the training-set size, decided when the data
# is known; see trainer/schedules.py). Ten equal "epochs" split the run.
SCHEDULE_DEFAULTS: dict[str, dict[str, Any]] = {
    "constant": {},
    "bit_hyperrule": {
        "optimizer": "sgd", "early_stopping_patience": 0, "augment": "resize_crop",
        "image_size": None, "mixup_alpha": None, "epochs": 10,
    },
}


# Fields that set one thing two ways (how a replica splits its batch): given on the
# command line, one replaces what the preset gave the other.
ALTERNATIVES = {"gradient_accumulation_steps": "micro_batch_size",
                "micro_batch_size": "gradient_accumulation_steps"}


def preset(name: str | None) -> Config:
    """Returns the configuration of a named experiment (defaults for None).

    Raises:
      UserError: an unknown name; lists the known ones.
    """
    if name is None:
        return Config()
    if name not in PRESETS:
        raise UserError(
            f"--experiment={name} is not a known experiment; choose one of "
            f"{', '.join(PRESETS)}."
        )
    return override(Config(experiment=name), PRESETS[name])


def configure(experiment: str | None, values: Mapping[str, Any]) -> Config:
    """The preset `experiment` (or the defaults), then `values` (fields or flag names).

    Between the two come the chosen schedule's defaults (SCHEDULE_DEFAULTS) for
    every field neither the preset nor `values` sets. A field of `values` in
    ALTERNATIVES clears the preset's value of its alternative.

    Raises:
      UserError: an unknown preset or field.
    """
    base = preset(experiment)
    explicit = {field_name(name) for name in values}
    base = override(base, {ALTERNATIVES[name]: None for name in explicit
                           if name in ALTERNATIVES and ALTERNATIVES[name] not in explicit})
    explicit |= set(PRESETS.get(experiment or "", {}))
    schedule = values.get("schedule", base.train.schedule)
    defaults = {name: value for name, value in SCHEDULE_DEFAULTS.get(schedule, {}).items()
                if name not in explicit}
    return override(override(base, defaults), values)
