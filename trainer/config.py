"""The run's configuration: frozen dataclasses whose fields carry their flag's help, resolution, checks, JSON.

Each field's help is written once, in its metadata: `trainer.cli` makes the
command-line flags from it. No TensorFlow here: `--print_config` and the flag
checks must not touch devices. Named presets live in `trainer.experiments`;
which settings a resumed run may change, beside the run directory in
`trainer.workdir`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

from trainer import backbones

OPTIMIZERS = ("adam", "sgd")
AUGMENTS = ("none", "flip_crop", "resize_crop")
SCHEDULES = ("constant", "bit_hyperrule")
MAX_TOTAL_STEPS = 1_000_000  # steps: the schedule holds a rate per step (a 4 MB float32 table here)
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
JIT_COMPILE = ("auto", "true", "false")
CACHES = ("auto", "memory", "file", "none")  # or a directory for the file cache
# BatchNorm momentum for statistics learned from scratch: PyTorch's default
# (0.1 in its convention), which the Wide ResNet authors' code trains with. Keras'
# 0.99 averages over ~100 steps, far behind the weights of a small dataset's run.
SCRATCH_BATCH_NORM_MOMENTUM = 0.9
KERAS_BATCH_NORM_MOMENTUM = 0.99  # Keras' default: what pretrained ResNet50 statistics were made with
SECTIONS = ("data", "model", "train")  # Config's sub-configurations


class UserError(Exception):
    """A problem the user fixes by changing a flag or a file; the message names which."""


def setting(default: Any, help: str, *, flag: str | None = None,
            choices: tuple[str, ...] | Callable[[], tuple[str, ...]] = ()) -> Any:
    """A config field with its command-line help (and flag name, when it differs).

    Args:
      default: the field's default.
      help: the flag's help text, written here only.
      flag: the flag's name when it is not the field's.
      choices: the valid values (or a function that returns them, for values registered
        at run time), listed in the help and checked by `check`.
    """
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag,
                                                         "choices": choices})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = setting(
        "tf_flowers", "A TFDS image-classification dataset (its `train` split is split into "
        "training and validation), or synthetic (generated stripes, offline).")
    data_dir: str | None = setting(
        None, "TFDS data directory; a dataset prepared there works offline.")
    image_dir: str | None = setting(
        None, "Folder with one sub-folder of images per class (JPEG, PNG, BMP, GIF); "
        "overrides --dataset.")
    val_fraction: float = setting(0.3, "Share of the examples held out for validation.")
    image_size: int | None = setting(
        224, "Square input size of the model (the training crop), pixels. "
        "--schedule=bit_hyperrule: default by the images' area, 128 below 96x96, else 480.")
    resize_size: int | None = setting(
        None, "--augment=resize_crop: training images are resized to this (pixels) and "
        "randomly cropped to --image_size. Default: BiT's ratio for the images' area "
        "(160/128 or 512/480).")
    global_batch_size: int = setting(
        16, "GLOBAL batch size: images per step, all replicas together.", flag="batch_size")
    augment: str = setting(
        "none", "Random changes to training images, after the cache: none; flip_crop (pad by "
        "1/8, random crop, flip); resize_crop (random crop of --image_size from --resize_size, "
        "flip; the default of --schedule=bit_hyperrule).", choices=AUGMENTS)
    mixup_alpha: float | None = setting(
        0.0, "MixUp Beta(alpha, alpha), one mixing weight per batch; 0 turns it off. "
        "--schedule=bit_hyperrule: default 0.1 from 20,000 training images up, else 0.")
    cache: str = setting(
        "auto", "Where decoded images are kept: auto (memory when they fit, else files under "
        "the workdir), memory, file, none, or a directory (a path with a /).")
    synthetic_examples: int = setting(1000, "Images in --dataset=synthetic.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    backbone: str = setting("bit", "The pretrained (or random) network under the head "
                            "(trainer/backbones/).", choices=backbones.names)
    weights: str = setting(
        "imagenet", "--backbone=resnet50: imagenet, none (random) or a weights file.")
    hub_handle: str | None = setting(
        None, "Hub backbones: URL or SavedModel directory (overrides the default handle).")
    bit_variant: str = setting(
        "s-r50x3", "--backbone=bit: which BiT (BiT-S: ImageNet-1k, BiT-M: ImageNet-21k; depth x "
        "width).", choices=lambda: backbones.spec("bit").variants)
    bit_weights: str | None = setting(
        None, "--backbone=bit: an .npz path or URL, or none (random). Default: the official "
        "file of --bit_variant, downloaded once.")
    trainable: bool | None = setting(
        None, "Fine-tune the backbone (--notrainable: train the head only). Default: train "
        "random backbones, freeze pretrained ones.")
    freeze_batch_norm: bool = setting(
        True, "Keep a pretrained backbone's BatchNorm statistics fixed while fine-tuning.")
    wrn_depth: int = setting(10, "--backbone=wide_resnet: layers, 6n+4.")
    wrn_width: int = setting(2, "--backbone=wide_resnet: channel multiplier k.")
    dropout_rate: float = setting(
        0.3, "--backbone=wide_resnet: dropout inside residual blocks (the paper's 0.3).")
    batch_norm_momentum: float | None = setting(
        None, "Momentum of the BatchNorm statistics the run trains (wide_resnet; resnet50 from "
        f"scratch or --nofreeze_batch_norm). Default: {SCRATCH_BATCH_NORM_MOMENTUM} from "
        f"scratch (suits short runs), {KERAS_BATCH_NORM_MOMENTUM} for pretrained statistics.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(
        20, "Maximum number of epochs. Under --schedule=bit_hyperrule: the number of equal "
        "parts the run's steps are split into, each ending with a validation (default 10).")
    early_stopping_patience: int = setting(
        2, "Epochs without val accuracy gain before stopping; 0 disables (the default of "
        "--schedule=bit_hyperrule).")
    optimizer: str = setting(
        "adam", "adam, or sgd (momentum 0.9; the default of --schedule=bit_hyperrule).",
        choices=OPTIMIZERS)
    learning_rate: float | None = setting(
        None, "Default: per preset; else 1e-5 to fine-tune a pretrained backbone, 1e-3 "
        "otherwise. --schedule=bit_hyperrule: the peak rate, default 0.003 * batch_size / 512.")
    schedule: str = setting(
        "constant", "constant (the --learning_rate throughout) or bit_hyperrule (BiT's warm-up "
        "and step decays over a number of steps chosen by the training-set size, with its "
        "MixUp, resolution and SGD).", choices=SCHEDULES)
    total_steps: int | None = setting(
        None, "--schedule=bit_hyperrule: optimizer steps of the run (the warm-up and decays "
        "scale with it). Default: the rule's 500, 10,000 or 20,000 by the training-set size.")
    precision: str = setting(
        "auto", "Keras mixed-precision policy; auto: mixed_bfloat16 on TPUs and CPUs with "
        "bfloat16 units, mixed_float16 on NVIDIA GPUs of compute capability 7.0+, else "
        "float32.", choices=PRECISIONS)
    strategy: str = setting(
        "auto", "tf.distribute strategy; auto: tpu with --tpu, multi_worker with TF_CONFIG, "
        "mirrored with several GPUs, else default.", choices=STRATEGIES)
    tpu: str | None = setting(None, "TPU name, or local on a TPU VM.")
    collective_timeout_sec: int = setting(
        600, "Multi-worker: seconds a collective may wait for a silent peer before the run "
        "stops (exit 4; restart all workers to resume).")
    steps_per_execution: int | None = setting(
        None, "Training steps per compiled call. Default: min(32, steps per epoch) on TPUs, "
        "1 elsewhere.")
    jit_compile: str = setting("auto", "XLA: auto (on GPUs only), true or false.",
                               choices=JIT_COMPILE)
    export: bool = setting(True, "Write the serving SavedModel (workdir/export) at the end.")
    export_backbone: bool = setting(
        False, "Also write the trained backbone as a TF Hub feature-vector SavedModel "
        "(workdir/export_backbone).")


@dataclasses.dataclass(frozen=True)
class Config:
    experiment: str | None = setting(
        None, "Named preset (trainer/experiments.py); flags given explicitly override it.")
    workdir: str | None = setting(
        None, "Directory of the run; rerunning with it resumes. Default: runs/<experiment or "
        "backbone>.")
    seed: int = setting(0, "Seeds the split, shuffling and initialisation.")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()


def choices(field: str) -> tuple[str, ...]:
    """The valid values of a config field, () when any value of its type may do."""
    listed = leaf_fields()[field].metadata.get("choices", ())
    return tuple(listed() if callable(listed) else listed)


def _sections(config: Config) -> dict[str, Any]:
    return {"": config, **{name: getattr(config, name) for name in SECTIONS}}


def leaf_fields(config: Config = Config()) -> dict[str, dataclasses.Field]:
    """Every leaf field by name, in declaration order (names are unique across sections)."""
    return {f.name: f for section in _sections(config).values()
            for f in dataclasses.fields(section) if f.name not in SECTIONS}


def flag_name(field: str) -> str:
    """The command-line name of a config field (`global_batch_size` -> `batch_size`); a flag
    name as given."""
    found = leaf_fields().get(field)
    return (found.metadata.get("flag") if found else None) or field


def field_name(name: str) -> str:
    """The config field a flag name sets (`batch_size` -> `global_batch_size`); fields as given."""
    return {flag_name(field): field for field in leaf_fields()}.get(name, name)


def flag(field: str) -> str:
    """Returns the command-line spelling (`--name`) of a config field."""
    return "--" + flag_name(field)


def flatten(config: Config) -> dict[str, Any]:
    """Returns every leaf field's value by name (names are unique across sections)."""
    return {name: getattr(section, name) for section in _sections(config).values()
            for name in (f.name for f in dataclasses.fields(section)) if name not in SECTIONS}


def override(config: Config, values: Mapping[str, Any]) -> Config:
    """Returns `config` with leaf fields replaced by name (flag spellings accepted).

    Raises:
      UserError: a name is not a configuration field.
    """
    changes: dict[str, dict[str, Any]] = {key: {} for key in _sections(config)}
    for name, value in values.items():
        field = field_name(name)
        for key, section in _sections(config).items():
            if field in {f.name for f in dataclasses.fields(section)} - set(SECTIONS):
                changes[key][field] = value
                break
        else:
            raise UserError(f"Unknown configuration field {name!r}.")
    top = {key: dataclasses.replace(getattr(config, key), **changes[key]) for key in SECTIONS}
    return dataclasses.replace(config, **changes[""], **top)


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
    values = flatten(config)
    for name in leaf_fields(config):
        if choices(name):
            _choice(name, values[name], choices(name))
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


