"""Run configuration: frozen dataclasses, experiment presets, resolution, checks, JSON.

No TensorFlow here: `--print_config` and the flag checks must not touch devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

BACKBONES = ("resnet50", "resnet50_hub", "bit", "hub", "wide_resnet")
HUB_BACKBONES = ("resnet50_hub", "hub")  # loaded with hub.KerasLayer
# BiT-S (ImageNet-1k) and BiT-M (ImageNet-21k) as published; R152x2 only as BiT-M.
BIT_VARIANTS = (
    "s-r50x1", "s-r50x3", "s-r101x1", "s-r101x3", "s-r152x4",
    "m-r50x1", "m-r50x3", "m-r101x1", "m-r101x3", "m-r152x2", "m-r152x4",
)
OPTIMIZERS = ("adam", "sgd")
AUGMENTS = ("none", "flip_crop")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
JIT_COMPILE = ("auto", "true", "false")


class UserError(Exception):
    """A problem the user fixes by changing a flag or a file; the message names which."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "tf_flowers"  # a TFDS name, or "synthetic"
    data_dir: str | None = None  # TFDS data directory (prepared data works offline)
    image_dir: str | None = None  # one sub-folder per class; overrides `dataset`
    val_fraction: float = 0.3  # share of the examples held out for validation
    image_size: int = 224  # pixels, square
    global_batch_size: int = 16  # images per step, all replicas together
    augment: str = "none"  # "none" or "flip_crop" (after the cache)
    cache: str = "memory"  # "memory", "none" or a file prefix
    synthetic_examples: int = 1000  # images in the synthetic dataset


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    backbone: str = "bit"
    weights: str = "imagenet"  # resnet50 only: "imagenet", "none" or a weights file
    hub_handle: str | None = None  # hub backbones: URL or SavedModel directory
    bit_variant: str = "s-r50x3"  # the reference's BiT (BiT-S R50x3)
    bit_weights: str | None = None  # bit: .npz path or URL; None: the official file; "none": random
    trainable: bool | None = None  # None: train random backbones, freeze pretrained
    freeze_batch_norm: bool = True  # pretrained BN backbones keep their statistics
    wrn_depth: int = 10  # Wide ResNet layers, 6n+4
    wrn_width: int = 2  # Wide ResNet channel multiplier k
    dropout_rate: float = 0.3  # Wide ResNet dropout inside residual blocks (paper: 0.3)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    early_stopping_patience: int = 2  # epochs without val-accuracy gain; 0 disables
    optimizer: str = "adam"  # "adam" or "sgd" (momentum 0.9)
    learning_rate: float | None = None  # None: 1e-5 to fine-tune pretrained, else 1e-3
    precision: str = "auto"
    strategy: str = "auto"
    tpu: str | None = None  # TPU name or "local" on a TPU VM
    collective_timeout_sec: int = 600  # multi-worker: a silent peer ends the run after this
    steps_per_execution: int = 1  # train steps per tf.function call
    jit_compile: str = "auto"  # "auto" turns XLA on for GPUs only
    export: bool = True  # write the serving SavedModel at the end
    export_backbone: bool = False  # also write the backbone in TF Hub format


@dataclasses.dataclass(frozen=True)
class Config:
    experiment: str | None = None
    workdir: str | None = None  # None: runs/<experiment or backbone>
    seed: int = 0  # split, shuffling and initialisation
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()


_FLOWERS = {"dataset": "tf_flowers", "image_size": 224, "global_batch_size": 16, "epochs": 20}

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "dataset": "synthetic", "backbone": "wide_resnet", "image_size": 32,
        "epochs": 2, "global_batch_size": 32, "learning_rate": 2e-3,
        "early_stopping_patience": 0,
    },
    # The six reference runs (DESIGN.md), each with the preprocessing its
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
}

# Flags whose name differs from the field they set.
FLAG_FOR_FIELD = {"global_batch_size": "batch_size"}
FIELD_FOR_FLAG = {flag: field for field, flag in FLAG_FOR_FIELD.items()}


def flag(field: str) -> str:
    """Returns the command-line spelling (`--name`) of a config field."""
    return "--" + FLAG_FOR_FIELD.get(field, field)


def _sections(config: Config) -> dict[str, Any]:
    return {"": config, "data": config.data, "model": config.model, "train": config.train}


def flatten(config: Config) -> dict[str, Any]:
    """Returns every leaf field by name (names are unique across sections)."""
    flat = {}
    for section in _sections(config).values():
        for f in dataclasses.fields(section):
            if f.name not in ("data", "model", "train"):
                flat[f.name] = getattr(section, f.name)
    return flat


def override(config: Config, values: Mapping[str, Any]) -> Config:
    """Returns `config` with leaf fields replaced by name (flag spellings accepted).

    Raises:
      UserError: a name is not a configuration field.
    """
    changes: dict[str, dict[str, Any]] = {key: {} for key in _sections(config)}
    for name, value in values.items():
        field = FIELD_FOR_FLAG.get(name, name)
        for key, section in _sections(config).items():
            names = {f.name for f in dataclasses.fields(section)} - {"data", "model", "train"}
            if field in names:
                changes[key][field] = value
                break
        else:
            raise UserError(f"Unknown configuration field {name!r}.")
    top = {
        key: dataclasses.replace(getattr(config, key), **changes[key])
        for key in ("data", "model", "train")
    }
    return dataclasses.replace(config, **changes[""], **top)


def preset(name: str | None) -> Config:
    """Returns the configuration of a named experiment (defaults for None)."""
    if name is None:
        return Config()
    if name not in PRESETS:
        raise UserError(
            f"--experiment={name} is not a known experiment; choose one of "
            f"{', '.join(PRESETS)}."
        )
    return override(Config(experiment=name), PRESETS[name])


def is_pretrained(model: ModelConfig) -> bool:
    """Whether the backbone starts from pretrained weights."""
    if model.backbone == "resnet50":
        return model.weights != "none"
    if model.backbone == "bit":
        return model.bit_weights != "none"
    return model.backbone in HUB_BACKBONES


def resolve(config: Config) -> Config:
    """Fills the defaults that depend on other fields, then checks the result.

    Raises:
      UserError: a value is out of range or values conflict; names the flag.
    """
    trainable = config.model.trainable
    if trainable is None:
        trainable = not is_pretrained(config.model)
    learning_rate = config.train.learning_rate
    if learning_rate is None:
        fine_tune = trainable and is_pretrained(config.model)
        learning_rate = 1e-5 if fine_tune else 1e-3
    workdir = config.workdir or os.path.join(
        "runs", config.experiment or config.model.backbone
    )
    resolved = override(
        config, {"trainable": trainable, "learning_rate": learning_rate, "workdir": workdir}
    )
    check(resolved)
    return resolved


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    _require(
        value in choices,
        f"{flag(field)}={value} is not valid; choose one of {', '.join(choices)}.",
    )


def check(config: Config) -> None:
    """Raises UserError naming the flag of the first invalid or conflicting value."""
    data, model, train = config.data, config.model, config.train
    _choice("backbone", model.backbone, BACKBONES)
    _choice("bit_variant", model.bit_variant, BIT_VARIANTS)
    _choice("optimizer", train.optimizer, OPTIMIZERS)
    _choice("augment", data.augment, AUGMENTS)
    _choice("precision", train.precision, PRECISIONS)
    _choice("strategy", train.strategy, STRATEGIES)
    _choice("jit_compile", train.jit_compile, JIT_COMPILE)
    _require(bool(data.dataset), "--dataset must not be empty.")
    _require(bool(data.cache), "--cache must be memory, none or a file prefix.")
    _require(bool(config.workdir), "--workdir must not be empty.")
    _require(0.0 < data.val_fraction < 1.0,
             f"--val_fraction must be between 0 and 1 (exclusive), got {data.val_fraction}.")
    _require(8 <= data.image_size <= 1024,
             f"--image_size must be between 8 and 1024 pixels, got {data.image_size}.")
    if model.backbone == "resnet50":
        _require(data.image_size >= 32,
                 f"--image_size must be at least 32 for --backbone=resnet50, got {data.image_size}.")
    _require(data.global_batch_size >= 1,
             f"--batch_size must be a positive global batch size, got {data.global_batch_size}.")
    _require(data.synthetic_examples >= 10,
             f"--synthetic_examples must be at least 10, got {data.synthetic_examples}.")
    _require(train.epochs >= 1, f"--epochs must be at least 1, got {train.epochs}.")
    _require(train.early_stopping_patience >= 0,
             f"--early_stopping_patience must be 0 (off) or more, got {train.early_stopping_patience}.")
    _require(train.learning_rate is not None and 0.0 < train.learning_rate <= 10.0,
             f"--learning_rate must be in (0, 10], got {train.learning_rate}.")
    _require(train.collective_timeout_sec >= 1,
             f"--collective_timeout_sec must be at least 1, got {train.collective_timeout_sec}.")
    _require(train.steps_per_execution >= 1,
             f"--steps_per_execution must be at least 1, got {train.steps_per_execution}.")
    _require(0.0 <= model.dropout_rate < 1.0,
             f"--dropout_rate must be in [0, 1), got {model.dropout_rate}.")
    _require(model.wrn_depth >= 10 and (model.wrn_depth - 4) % 6 == 0,
             f"--wrn_depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {model.wrn_depth}.")
    _require(1 <= model.wrn_width <= 16, f"--wrn_width must be 1 to 16, got {model.wrn_width}.")
    _require(bool(model.weights), "--weights must be imagenet, none or a weights file.")
    if model.hub_handle is not None:
        _require(model.backbone in HUB_BACKBONES,
                 f"--hub_handle applies to the hub backbones ({', '.join(HUB_BACKBONES)}), "
                 f"not --backbone={model.backbone}.")
    if model.bit_weights is not None:
        _require(model.backbone == "bit",
                 f"--bit_weights applies to --backbone=bit, not --backbone={model.backbone}.")
        _require(bool(model.bit_weights), "--bit_weights must be an .npz path or URL, or none.")
    if model.backbone == "hub":
        _require(bool(model.hub_handle), "--backbone=hub needs --hub_handle (a TF2 SavedModel "
                 "image feature vector: URL or directory).")
    _require(model.trainable or is_pretrained(model),
             f"--notrainable would freeze a randomly initialised backbone "
             f"(--backbone={model.backbone}"
             + (" --weights=none" if model.backbone == "resnet50" else "")
             + (" --bit_weights=none" if model.backbone == "bit" else "")
             + "); train it with --trainable or start from pretrained weights.")
    if train.strategy == "tpu":
        _require(bool(train.tpu), "--strategy=tpu needs --tpu (its name, or local on a TPU VM).")


def to_json(config: Config) -> str:
    """Returns the configuration as indented JSON (sections as objects)."""
    return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True)


def from_json(text: str) -> Config:
    """Parses what `to_json` wrote."""
    raw = json.loads(text)
    return Config(
        **{k: v for k, v in raw.items() if k not in ("data", "model", "train")},
        data=DataConfig(**raw["data"]),
        model=ModelConfig(**raw["model"]),
        train=TrainConfig(**raw["train"]),
    )


def differences(a: Config, b: Config) -> list[str]:
    """Returns the flags whose values differ between two configurations."""
    flat_a, flat_b = flatten(a), flatten(b)
    return [flag(name) for name in flat_a if flat_a[name] != flat_b[name]]
