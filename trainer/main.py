"""Command line: absl flags -> Config -> train_and_evaluate. The only module that reads FLAGS.

  python -m trainer.main --backbone=bit --trainable --workdir=runs/bit-ft
  python -m trainer.main --experiment=smoke --workdir=runs/smoke
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from trainer import sigterm

if __name__ == "__main__":
    # Before TensorFlow loads (seconds): SIGTERM then exits 143 at once, even as PID 1.
    sigterm.install()

from absl import app, flags, logging  # noqa: E402  after the SIGTERM handler

# tensorflow_hub defines --tfhub_cache_dir and --tfhub_model_load_format;
# importing it makes them valid here (never redefine them).
import tensorflow_hub  # noqa: E402,F401  pylint: disable=unused-import

from trainer import backbones  # noqa: E402
from trainer import config as config_lib  # noqa: E402
from trainer import train  # noqa: E402
from trainer.cli import fail, parse_flags  # noqa: E402
from trainer.callbacks import TrainingError  # noqa: E402
from trainer.sigterm import Preempted  # noqa: E402

_D = config_lib.Config()
EXIT_TRAINING_FAILED = 3  # the loss diverged: rerunning as is will not help
EXIT_PEER_LOST = 4  # a multi-worker peer vanished: restart all workers to resume
EXIT_PREEMPTED = sigterm.EXIT_CODE  # 143: progress is saved, rerun the same command

flags.DEFINE_enum("experiment", None, list(config_lib.PRESETS),
                  "Named preset; flags given explicitly override it.")
flags.DEFINE_string("workdir", None, "Directory of the run; rerunning with it resumes. "
                    "Default runs/<experiment or backbone>.")
flags.DEFINE_integer("seed", _D.seed, "Seeds the split, shuffling and initialisation.")
flags.DEFINE_bool("print_config", False, "Print the resolved configuration as JSON and exit.")
# Model.
flags.DEFINE_string("backbone", _D.model.backbone, "One of " + ", ".join(backbones.names()) + ".")
flags.DEFINE_string("weights", _D.model.weights, "resnet50 only: imagenet, none or a weights file.")
flags.DEFINE_string("hub_handle", None, "Hub backbones: URL or SavedModel directory "
                    "(overrides the default handle).")
flags.DEFINE_string("bit_variant", _D.model.bit_variant, "BiT model: " + ", ".join(backbones.spec("bit").variants) + ".")
flags.DEFINE_string("bit_weights", None, "BiT weights: an .npz path or URL, or none (random). "
                    "Default: the official file of --bit_variant.")
flags.DEFINE_bool("trainable", None, "Fine-tune the backbone (--notrainable: train the head "
                  "only). Default: train random backbones, freeze pretrained ones.")
flags.DEFINE_bool("freeze_batch_norm", _D.model.freeze_batch_norm,
                  "Keep a pretrained backbone's BatchNorm statistics fixed while fine-tuning.")
flags.DEFINE_integer("wrn_depth", _D.model.wrn_depth, "Wide ResNet depth (6n+4).")
flags.DEFINE_integer("wrn_width", _D.model.wrn_width, "Wide ResNet width multiplier.")
flags.DEFINE_float("dropout_rate", _D.model.dropout_rate, "Wide ResNet dropout in residual blocks.")
flags.DEFINE_float("batch_norm_momentum", None, "Momentum of the BatchNorm statistics the run "
                   "trains (wide_resnet; resnet50 from scratch or --nofreeze_batch_norm). Default: "
                   f"{config_lib.SCRATCH_BATCH_NORM_MOMENTUM} from scratch (suits short runs), "
                   f"{config_lib.KERAS_BATCH_NORM_MOMENTUM} for pretrained statistics.")
# Data.
flags.DEFINE_string("dataset", _D.data.dataset, "TFDS image dataset (image, label) or synthetic.")
flags.DEFINE_string("data_dir", None, "TFDS data directory (prepared data works offline).")
flags.DEFINE_string("image_dir", None, "Folder with one sub-folder of images per class; "
                    "overrides --dataset.")
flags.DEFINE_float("val_fraction", _D.data.val_fraction, "Share of the data held out for validation.")
flags.DEFINE_integer("image_size", _D.data.image_size, "Square input size of the model (the "
                     "training crop), pixels. --schedule=bit_hyperrule: default by the images' "
                     "area, 128 below 96x96, else 480.")
flags.DEFINE_integer("resize_size", None, "--augment=resize_crop: training images are resized "
                     "to this (pixels) and randomly cropped to --image_size. Default: BiT's "
                     "ratio for the images' area (160/128 or 512/480).")
flags.DEFINE_integer("batch_size", _D.data.global_batch_size, "GLOBAL batch size (all replicas).")
flags.DEFINE_string("augment", _D.data.augment, "none; flip_crop (pad by 1/8, random crop, "
                    "flip); resize_crop (random crop of --image_size from --resize_size, flip; "
                    "the default of --schedule=bit_hyperrule).")
flags.DEFINE_float("mixup_alpha", _D.data.mixup_alpha, "MixUp Beta(alpha, alpha), one mixing "
                   "weight per batch; 0 turns it off. --schedule=bit_hyperrule: default 0.1 "
                   "from 20,000 training images up, else 0.")
flags.DEFINE_string("cache", _D.data.cache, "Where decoded images are kept: auto (memory when "
                    "they fit, else files under the workdir), memory, file, none, or a directory.")
flags.DEFINE_integer("synthetic_examples", _D.data.synthetic_examples, "Images in --dataset=synthetic.")
# Training.
flags.DEFINE_integer("epochs", _D.train.epochs, "Maximum number of epochs. Under "
                     "--schedule=bit_hyperrule: the number of equal parts the run's steps are "
                     "split into, each ending with a validation (default 10).")
flags.DEFINE_string("schedule", _D.train.schedule, "constant (the --learning_rate throughout) "
                    "or bit_hyperrule (BiT's warm-up and step decays over a number of steps "
                    "chosen by the training-set size, with its MixUp, resolution and SGD).")
flags.DEFINE_integer("total_steps", None, "--schedule=bit_hyperrule: optimizer steps of the "
                     "run (the warm-up and decays scale with it). Default: the rule's 500, "
                     "10,000 or 20,000 by the training-set size.")
flags.DEFINE_integer("early_stopping_patience", _D.train.early_stopping_patience,
                     "Epochs without val accuracy gain before stopping; 0 disables "
                     "(the default of --schedule=bit_hyperrule).")
flags.DEFINE_string("optimizer", _D.train.optimizer, "adam or sgd (momentum 0.9; the default "
                    "of --schedule=bit_hyperrule).")
flags.DEFINE_float("learning_rate", None, "Default: per preset; else 1e-5 to fine-tune a "
                   "pretrained backbone, 1e-3 otherwise. --schedule=bit_hyperrule: the peak "
                   "rate, default 0.003 * batch_size / 512.")
flags.DEFINE_string("precision", _D.train.precision, ", ".join(config_lib.PRECISIONS) + ".")
flags.DEFINE_string("strategy", _D.train.strategy, ", ".join(config_lib.STRATEGIES) + ".")
flags.DEFINE_string("tpu", None, "TPU name, or local on a TPU VM.")
flags.DEFINE_integer("collective_timeout_sec", _D.train.collective_timeout_sec,
                     "Multi-worker: seconds a collective may wait for a silent peer.")
flags.DEFINE_integer("steps_per_execution", _D.train.steps_per_execution,
                     "Training steps per compiled call. Default: min(32, steps per epoch) on "
                     "TPUs, 1 elsewhere.")
flags.DEFINE_string("jit_compile", _D.train.jit_compile, "auto (XLA on GPUs only), true or false.")
flags.DEFINE_bool("export", _D.train.export, "Write the serving SavedModel at the end.")
flags.DEFINE_bool("export_backbone", _D.train.export_backbone,
                  "Also write the trained backbone as a TF Hub feature-vector SavedModel.")

FLAGS = flags.FLAGS
CONFIG_FLAGS = tuple(config_lib.flatten(_D)) + ("batch_size",)


def _is_trainer_or_warning(record: std_logging.LogRecord) -> bool:
    package_dir = os.path.dirname(os.path.abspath(__file__))
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(package_dir)


def quiet_library_info_lines() -> None:
    """Keeps the trainer's INFO lines and everyone's warnings: TensorFlow's INFO lines
    (checkpoint sharding, SavedModel tracing) drown the one line per epoch."""
    logging.get_absl_handler().addFilter(_is_trainer_or_warning)
    std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)


def config_from_flags(flag_values: flags.FlagValues) -> config_lib.Config:
    """Preset (or defaults) overridden by every flag given on the command line."""
    given = {
        name: flag_values[name].value
        for name in CONFIG_FLAGS
        if name in flag_values and flag_values[name].present
    }
    return config_lib.resolve(config_lib.configure(flag_values.experiment, given))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; every option is a --flag.")
    try:
        config = config_from_flags(FLAGS)
        if FLAGS.print_config:
            sys.stdout.write(config_lib.to_json(config) + "\n")
            return
        quiet_library_info_lines()

        train.train_and_evaluate(config)
    except config_lib.UserError as e:
        fail(str(e))
    except TrainingError as e:
        fail(str(e), EXIT_TRAINING_FAILED)
    except train.PeerLost as e:
        fail(str(e), EXIT_PEER_LOST)
    except Preempted as e:
        fail(str(e), EXIT_PREEMPTED)
    logging.info("Done: %s", config.workdir)


def run() -> None:
    """Entry point of `python -m trainer.main` and the `trainer` console script."""
    sigterm.install()  # the console script's first line (done already under -m)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
