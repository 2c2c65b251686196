"""Run configuration: frozen dataclasses, experiment presets, resolution, checks, JSON.

No TensorFlow here: `--print_config` and the flag checks must not touch devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from trainer import backbones

OPTIMIZERS = ("adam", "sgd")
AUGMENTS = ("none", "flip_crop", "resize_crop")
SCHEDULES = ("constant", "bit_hyperrule")
MAX_TOTAL_STEPS = 1_000_000  # steps: the schedule holds a rate per step (a 4 MB float32 table here)
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
JIT_COMPILE = ("auto", "true", "false")
# BatchNorm momentum for statistics learned from scratch: PyTorch's default
# (0.1 in its convention), which the Wide ResNet authors' code trains with. Keras'
# 0.99 averages over ~100 steps, far behind the weights of a small dataset's run.
SCRATCH_BATCH_NORM_MOMENTUM = 0.9
KERAS_BATCH_NORM_MOMENTUM = 0.99  # Keras' default: what pretrained ResNet50 statistics were made with
CACHES = ("auto", "memory", "file", "none")  # or a directory for the file cache


class UserError(Exception):
    """A problem the user fixes by changing a flag or a file; the message names which."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "tf_flowers"  # a TFDS name, or "synthetic"
    data_dir: str | None = None  # TFDS data directory (prepared data works offline)
    image_dir: str | None = None  # one sub-folder per class; overrides `dataset`
    val_fraction: float = 0.3  # share of the examples held out for validation
    # pixels, square: the model's input (the training crop); None: by the
    # images' area (--schedule=bit_hyperrule: 128 below 96x96, else 480)
    image_size: int | None = 224
    # pixels, square: --augment=resize_crop stores training images at this size
    # and crops image_size from them; None: the rule's ratio (160/128 or 512/480)
    resize_size: int | None = None
    global_batch_size: int = 16  # images per step, all replicas together
    augment: str = "none"  # "none", "flip_crop" or "resize_crop" (random parts after the cache)
    # MixUp's Beta(alpha, alpha), one mixing weight per batch; 0: off; None: by
    # the training-set size (--schedule=bit_hyperrule: 0.1 from 20,000 images up)
    mixup_alpha: float | None = 0.0
    # "auto": memory when the decoded images fit, else files under the workdir;
    # "memory", "file" (under the workdir), "none", or a directory for the files.
    cache: str = "auto"
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
    # Moving-average momentum of the BatchNorm statistics this run trains (native
    # backbones); None: 0.9 from scratch, Keras' 0.99 for pretrained ones (see resolve).
    batch_norm_momentum: float | None = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # constant: the dataset's epochs; bit_hyperrule: equal parts of total_steps
    epochs: int = 20
    early_stopping_patience: int = 2  # epochs without val-accuracy gain; 0 disables
    optimizer: str = "adam"  # "adam" or "sgd" (momentum 0.9)
    # None: 1e-5 to fine-tune pretrained, else 1e-3; under bit_hyperrule the
    # peak rate after warm-up, None: 0.003 * global_batch_size / 512
    learning_rate: float | None = None
    schedule: str = "constant"  # "constant" rate, or "bit_hyperrule" (warm-up, step decays)
    # optimizer steps of a bit_hyperrule run; None: the rule's, by the
    # training-set size (500, 10,000 or 20,000)
    total_steps: int | None = None
    precision: str = "auto"
    strategy: str = "auto"
    tpu: str | None = None  # TPU name or "local" on a TPU VM
    collective_timeout_sec: int = 600  # multi-worker: a silent peer ends the run after this
    steps_per_execution: int | None = None  # train steps per compiled call; None: by hardware
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
    # tf_flowers. The authors' batch of 512 at 480 px needs TPU-pod memory; 64
    # is meant for about 24 GB of accelerator memory, and the rate scales with it.
    "bit_hyperrule": {
        "dataset": "tf_flowers", "backbone": "bit", "bit_variant": "m-r50x1",
        "trainable": True, "schedule": "bit_hyperrule", "global_batch_size": 64,
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


def configure(experiment: str | None, values: Mapping[str, Any]) -> Config:
    """The preset `experiment` (or the defaults), then `values` (fields or flag names).

    Between the two come the chosen schedule's defaults (SCHEDULE_DEFAULTS) for
    every field neither the preset nor `values` sets.

    Raises:
      UserError: an unknown preset or field.
    """
    base = preset(experiment)
    explicit = {FIELD_FOR_FLAG.get(name, name) for name in values}
    explicit |= set(PRESETS.get(experiment or "", {}))
    schedule = values.get("schedule", base.train.schedule)
    defaults = {name: value for name, value in SCHEDULE_DEFAULTS.get(schedule, {}).items()
                if name not in explicit}
    return override(override(base, defaults), values)


def backbone(model: ModelConfig) -> backbones.Spec:
    """The spec of --backbone.

    Raises:
      UserError: no registered backbone has that name; lists those that do.
    """
    try:
        return backbones.spec(model.backbone)
    except KeyError:
        raise UserError(f"--backbone={model.backbone} is not valid; choose one of "
                        f"{', '.join(backbones.names())}.") from None


def trains_batch_norm_statistics(model: ModelConfig) -> bool:
    """Whether training updates the statistics of BatchNorm layers built here (not in a
    hub model, not pretrained ones kept fixed by --freeze_batch_norm)."""
    spec = backbone(model)
    return (spec.native_batch_norm and bool(model.trainable)
            and not (model.freeze_batch_norm and spec.pretrained(model)))


def local_path(path: str | None) -> str | None:
    """The absolute form of a local path, so that two spellings of one place compare equal;
    URLs (`scheme://...`), None and "" unchanged."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def resolve(config: Config) -> Config:
    """Fills the defaults that depend on other fields, normalises paths, then checks the result.

    Raises:
      UserError: a value is out of range or values conflict; names the flag.
    """
    model = config.model
    pretrained = backbone(model).pretrained(model)
    trainable = model.trainable
    if trainable is None:
        trainable = not pretrained
    learning_rate = config.train.learning_rate
    # Under bit_hyperrule None stays: the rule's peak rate is set when the run starts.
    if learning_rate is None and config.train.schedule != "bit_hyperrule":
        fine_tune = trainable and pretrained
        learning_rate = 1e-5 if fine_tune else 1e-3
    momentum = model.batch_norm_momentum
    if momentum is None and trains_batch_norm_statistics(
            dataclasses.replace(model, trainable=trainable)):
        momentum = KERAS_BATCH_NORM_MOMENTUM if pretrained else SCRATCH_BATCH_NORM_MOMENTUM
    workdir = config.workdir or os.path.join(
        "runs", config.experiment or model.backbone
    )
    keyword_weights = ("imagenet", "none")  # not paths
    resolved = override(config, {
        "trainable": trainable, "learning_rate": learning_rate, "batch_norm_momentum": momentum,
        # Kept as given (relative to where the run starts), only respelled: runs/x/ is runs/x.
        "workdir": os.path.normpath(workdir) if "://" not in workdir else workdir,
        "data_dir": local_path(config.data.data_dir),
        "image_dir": local_path(config.data.image_dir),
        "hub_handle": local_path(model.hub_handle),
        "weights": model.weights if model.weights in keyword_weights else local_path(model.weights),
        "bit_weights": model.bit_weights if model.bit_weights == "none" else local_path(model.bit_weights),
    })
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
    spec = backbone(model)
    _choice("optimizer", train.optimizer, OPTIMIZERS)
    _choice("augment", data.augment, AUGMENTS)
    _choice("schedule", train.schedule, SCHEDULES)
    _choice("precision", train.precision, PRECISIONS)
    _choice("strategy", train.strategy, STRATEGIES)
    _choice("jit_compile", train.jit_compile, JIT_COMPILE)
    _require(bool(data.dataset), "--dataset must not be empty.")
    # A directory needs a "/": a misspelt mode must not become a directory.
    _require(data.cache in CACHES or "/" in data.cache,
             f"--cache={data.cache} is not valid; choose one of {', '.join(CACHES)}, or a "
             "directory for the file cache, as a path with a / (./cache, /mnt/ssd/cache).")
    _require(bool(config.workdir), "--workdir must not be empty.")
    _require(0.0 < data.val_fraction < 1.0,
             f"--val_fraction must be between 0 and 1 (exclusive), got {data.val_fraction}.")
    _check_image_sizes(data, train)
    _require(data.global_batch_size >= 1,
             f"--batch_size must be a positive global batch size, got {data.global_batch_size}.")
    _require(data.synthetic_examples >= 10,
             f"--synthetic_examples must be at least 10, got {data.synthetic_examples}.")
    _require(train.epochs >= 1, f"--epochs must be at least 1, got {train.epochs}.")
    _require(train.early_stopping_patience >= 0,
             f"--early_stopping_patience must be 0 (off) or more, got {train.early_stopping_patience}.")
    _check_schedule(data, train)
    _require(train.collective_timeout_sec >= 1,
             f"--collective_timeout_sec must be at least 1, got {train.collective_timeout_sec}.")
    _require(train.steps_per_execution is None or train.steps_per_execution >= 1,
             f"--steps_per_execution must be at least 1, got {train.steps_per_execution}.")
    _check_backbone(model, data, spec)
    if train.strategy == "tpu":
        _require(bool(train.tpu), "--strategy=tpu needs --tpu (its name, or local on a TPU VM).")


def _check_backbone(model: ModelConfig, data: DataConfig, spec: backbones.Spec) -> None:
    """Every backbone's field checks, then those of the chosen one (see backbones.Spec)."""
    for other in backbones.specs():
        other.check_fields(model)
        # A field that is None unless set, set although the chosen backbone does not read it.
        for name in other.fields:
            if getattr(model, name) is not None and getattr(ModelConfig(), name) is None:
                readers = [s.name for s in backbones.specs() if name in s.fields]
                _require(model.backbone in readers, f"--{name} applies to --backbone="
                         f"{' or '.join(readers)}, not --backbone={model.backbone}.")
    if model.batch_norm_momentum is not None:
        _require(0.0 <= model.batch_norm_momentum < 1.0,
                 f"--batch_norm_momentum must be in [0, 1), got {model.batch_norm_momentum}.")
        native = " or ".join(s.name for s in backbones.specs() if s.native_batch_norm)
        why = ("a hub model keeps its own layers" if spec.saved_model else "no BatchNorm "
               "layers built here" if not spec.native_batch_norm else "statistics kept fixed")
        _require(trains_batch_norm_statistics(model),
                 "--batch_norm_momentum applies to BatchNorm statistics this run trains: "
                 f"--backbone={native} from scratch or with --nofreeze_batch_norm; not "
                 f"--backbone={model.backbone} ({why}).")
    spec.check(model, data)
    random = "".join(f" {flag(name)}=none" for name in spec.fields if getattr(model, name) == "none")
    _require(model.trainable or spec.pretrained(model),
             f"--notrainable would freeze a randomly initialised backbone "
             f"(--backbone={model.backbone}{random}); train it with --trainable or start "
             "from pretrained weights.")


def _check_image_sizes(data: DataConfig, train: TrainConfig) -> None:
    if data.image_size is None:
        _require(train.schedule == "bit_hyperrule",
                 "--image_size must be given (pixels); only --schedule=bit_hyperrule chooses "
                 "it from the images' area.")
    else:
        _require(8 <= data.image_size <= 1024,
                 f"--image_size must be between 8 and 1024 pixels, got {data.image_size}.")
    if data.resize_size is not None:
        _require(data.augment == "resize_crop",
                 f"--resize_size={data.resize_size} applies to --augment=resize_crop (random "
                 f"crops of --image_size from images resized to --resize_size), not "
                 f"--augment={data.augment}.")
        _require(8 <= data.resize_size <= 2048 and data.resize_size >= (data.image_size or 8),
                 f"--resize_size must be between --image_size ({data.image_size or 'by area'}) "
                 f"and 2048 pixels, got {data.resize_size}.")


def _check_schedule(data: DataConfig, train: TrainConfig) -> None:
    rule = train.schedule == "bit_hyperrule"
    if train.learning_rate is not None or not rule:
        _require(train.learning_rate is not None and 0.0 < train.learning_rate <= 10.0,
                 f"--learning_rate must be in (0, 10], got {train.learning_rate}.")
    if data.mixup_alpha is None:
        _require(rule, "--mixup_alpha must be given (0 turns MixUp off); only "
                 "--schedule=bit_hyperrule chooses it from the training-set size.")
    else:
        _require(0.0 <= data.mixup_alpha <= 10.0,
                 f"--mixup_alpha must be 0 (off) to 10, got {data.mixup_alpha}.")
    if train.total_steps is None:
        return
    _require(rule, f"--total_steps={train.total_steps} applies to --schedule=bit_hyperrule; "
             "the constant schedule trains --epochs passes over the data.")
    _require(1 <= train.total_steps <= MAX_TOTAL_STEPS,
             f"--total_steps must be 1 to {MAX_TOTAL_STEPS:,}, got {train.total_steps}.")
    check_epochs_divide(train.epochs, train.total_steps, "--total_steps")


def check_epochs_divide(epochs: int, total_steps: int, source: str) -> None:
    """Under bit_hyperrule the run's steps are split into `epochs` equal parts.

    Args:
      epochs: --epochs.
      total_steps: the run's optimizer steps.
      source: where total_steps came from, for the message.

    Raises:
      UserError: `epochs` does not divide `total_steps`; lists the values that do.
    """
    divisors = [d for d in range(1, min(total_steps, 1000) + 1) if total_steps % d == 0]
    _require(total_steps % epochs == 0,
             f"--epochs={epochs} must divide the run's {total_steps} steps ({source}) into "
             f"equal parts, each ending with a validation and a backup; use one of "
             f"{', '.join(map(str, divisors[:16]))}{', ...' if len(divisors) > 16 else ''}, "
             "or change --total_steps.")


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


# Settings that may change between attempts at one run (its resumes): they change
# where, how fast or how long it runs, not what an epoch computes. Every other
# field is the run's identity (model, data, optimisation, global batch, seed).
ATTEMPT_SETTINGS = frozenset({
    "experiment",  # a preset only fills the other fields, which are compared
    "workdir",  # the run is the directory its files are in, however it is spelled
    "cache",  # the same decoded images, from memory, a file or no cache
    "epochs",  # raising it continues a run; below the epochs done is refused (workdir.prepare)
    "early_stopping_patience",  # when to stop, not what an epoch computes
    "precision",  # variables stay float32; a run preempted on a TPU can resume on GPUs
    "strategy", "tpu",  # the global batch is compared, not how it is spread over replicas
    "collective_timeout_sec", "steps_per_execution", "jit_compile",  # how fast
    "export", "export_backbone",  # what is written at the end
})


def identity_settings(config: Config) -> set[str]:
    """The fields compared on resume: all but ATTEMPT_SETTINGS. Under bit_hyperrule
    --epochs is compared too: it splits the run's fixed steps into epochs, so another
    value would change the steps of the epochs still to run."""
    fields = set(flatten(config)) - ATTEMPT_SETTINGS
    return fields | {"epochs"} if config.train.schedule == "bit_hyperrule" else fields


def differences(a: Config, b: Config) -> list[str]:
    """Returns the flags of the settings that change results (a run's identity) and differ.

    Paths are compared as `resolve` normalised them.
    """
    flat_a, flat_b = flatten(a), flatten(b)
    compared = identity_settings(a)
    return [flag(name) for name in flat_a if name in compared and flat_a[name] != flat_b[name]]


def attempt_changes(a: Config, b: Config) -> list[str]:
    """Returns `--flag: old -> new` for each setting that may change between attempts and
    differs (those `identity_settings` leaves out)."""
    flat_a, flat_b = flatten(a), flatten(b)
    compared = identity_settings(a)
    return [f"{flag(name)}: {flat_a[name]} -> {flat_b[name]}" for name in flat_a
            if name not in compared and flat_a[name] != flat_b[name]]
