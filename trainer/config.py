"""The run's configuration: frozen dataclasses whose fields carry their flag's help; names, overrides, JSON.

Each field's help is written once, in its metadata: `trainer.cli` makes the
command-line flags from it. No TensorFlow here: `--print_config` and the flag
checks must not touch devices. Filling the defaults that depend on other
fields and checking the values: `trainer.checks`. Named presets:
`trainer.experiments`. Which settings a resumed run may change: beside the run
directory in `trainer.workdir`.
"""

from __future__ import annotations

import dataclasses
import json
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
TFLITE_EXPORTS = ("none", "float32", "float16", "dynamic", "int8")
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
    dataset: str | None = setting(
        "tf_flowers", "A TFDS image-classification dataset (its `train` split is split into "
        "training and validation), or synthetic (generated stripes, offline).")
    data_dir: str | None = setting(
        None, "TFDS data directory; a dataset prepared there works offline.")
    image_dir: str | None = setting(
        None, "Folder with one sub-folder of images per class (JPEG, PNG, BMP, GIF); "
        "overrides --dataset (the run's config.json then records no dataset).")
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
        "the workdir), memory, file, none, or a directory (a path with a /): a file cache "
        "that runs reading the same images at the same size share, so only the first "
        "decodes them (scripts/run_experiments.sh gives its runs one).")
    synthetic_examples: int = setting(1000, "Images in --dataset=synthetic.")
    examples_per_class: int | None = setting(
        None, "Few-shot: train on this many examples of each class, chosen from the training "
        "split by --seed (validation untouched; BiT-HyperRule's length follows the smaller "
        "size). Default: every training example.")


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
    label_smoothing: float = setting(
        0.0, "Label smoothing s of the cross-entropy: the true class's target is 1 - s + s/K, "
        "each other class's s/K (K classes); 0 turns it off.")
    ema_decay: float = setting(
        0.0, "Exponential moving average of the trained weights, decay per optimizer step "
        "(warmed up as min(decay, (1+t)/(10+t)) after t steps); validation, the best "
        "checkpoint and the exports use the averaged weights. 0 turns it off; 0.999 is usual.")
    gradient_accumulation_steps: int | None = setting(
        None, "Micro-batches each replica splits its share of --batch_size into, computed one "
        "after the other; their mean gradient is applied once, so --batch_size stays the "
        "batch of one optimizer step, in less memory. Default: 1, or as --micro_batch_size "
        "makes it.")
    micro_batch_size: int | None = setting(
        None, "Most images a replica computes in one forward and backward pass: sets "
        "--gradient_accumulation_steps to the fewest micro-batches of at most this size that "
        "split the replica's batch evenly (so it adapts to the number of replicas). Default: "
        "the whole batch.")
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
    export_tflite: str = setting(
        "none", "Also write workdir/export/model.tflite, converted from the SavedModel: float32, "
        "float16 (weights), dynamic (int8 weights) or int8 (weights and activations, "
        "calibrated on training images); it is evaluated on the validation split "
        "(tflite_val_accuracy in summary.json).", choices=TFLITE_EXPORTS)


@dataclasses.dataclass(frozen=True)
class Config:
    experiment: str | None = setting(
        None, "Named preset (trainer/experiments.py); flags given explicitly override it.")
    workdir: str | None = setting(
        None, "Directory of the run; rerunning with it resumes. Default: runs/<experiment or "
        "backbone>.")
    seed: int = setting(0, "Seeds the split of an image folder or synthetic data (a TFDS "
                        "dataset is split in its stored order), shuffling and initialisation.")
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


