"""What makes a Config valid: `resolve` fills the defaults that depend on other fields and
normalises paths, `check` names the flag of the first bad or conflicting value.

No TensorFlow here, as in trainer/config.py: the flag checks must not touch devices.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from trainer import backbones
from trainer.config import (CACHES, KERAS_BATCH_NORM_MOMENTUM, MAX_TOTAL_STEPS,
                            SCRATCH_BATCH_NORM_MOMENTUM, Config, DataConfig, ModelConfig,
                            TrainConfig, UserError, choices, flag, flatten, leaf_fields,
                            override)


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


def data_used(config: Config) -> Config:
    """--image_dir overrides --dataset: the config then records no dataset (None), so that
    config.json and the HParams name the data the run used. Applied by `resolve`, and to
    the config.json of runs made before (workdir.read_config), so that they resume."""
    if config.data.image_dir and config.data.dataset is not None:
        return override(config, {"dataset": None})
    return config


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
    resolved = data_used(resolved)
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
    _require(bool(data.dataset or data.image_dir), "--dataset must not be empty.")
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
    _require(data.examples_per_class is None or data.examples_per_class >= 1,
             f"--examples_per_class must be at least 1, got {data.examples_per_class}.")
    _require(train.epochs >= 1, f"--epochs must be at least 1, got {train.epochs}.")
    _require(train.early_stopping_patience >= 0,
             f"--early_stopping_patience must be 0 (off) or more, got {train.early_stopping_patience}.")
    _check_schedule(data, train)
    _check_training_step(data, train)
    _require(train.collective_timeout_sec >= 1,
             f"--collective_timeout_sec must be at least 1, got {train.collective_timeout_sec}.")
    _require(train.steps_per_execution is None or train.steps_per_execution >= 1,
             f"--steps_per_execution must be at least 1, got {train.steps_per_execution}.")
    _check_backbone(model, data, spec)
    _require(train.export or train.export_tflite == "none",
             f"--export_tflite={train.export_tflite} converts the SavedModel export: it needs "
             "--export (drop --noexport), or use --export_tflite=none.")
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


def _check_training_step(data: DataConfig, train: TrainConfig) -> None:
    _require(0.0 <= train.label_smoothing < 1.0,
             f"--label_smoothing must be in [0, 1), got {train.label_smoothing}.")
    _require(0.0 <= train.ema_decay < 1.0,
             f"--ema_decay must be 0 (off) or in (0, 1), got {train.ema_decay}.")
    steps, micro = train.gradient_accumulation_steps, train.micro_batch_size
    _require(steps is None or micro is None,
             f"--gradient_accumulation_steps={steps} and --micro_batch_size={micro} both set "
             "how a replica splits its batch; give one of them.")
    _require(micro is None or micro >= 1, f"--micro_batch_size must be at least 1, got {micro}.")
    if steps is not None:
        _require(steps >= 1, f"--gradient_accumulation_steps must be at least 1, got {steps}.")
        _require(data.global_batch_size % steps == 0,
                 f"--batch_size={data.global_batch_size} must split into "
                 f"--gradient_accumulation_steps={steps} equal micro-batches; use a multiple "
                 f"of {steps} as --batch_size, or a divisor of {data.global_batch_size} as "
                 "--gradient_accumulation_steps.")


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
