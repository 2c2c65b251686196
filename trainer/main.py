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

from trainer import cli, distribute, experiments, train  # noqa: E402
from trainer import checks
from trainer import config as config_lib  # noqa: E402
from trainer.cli import fail, parse_flags  # noqa: E402
from trainer.callbacks import TrainingError  # noqa: E402
from trainer.sigterm import Preempted  # noqa: E402

EXIT_TRAINING_FAILED = 3  # the loss diverged: rerunning as is will not help
EXIT_PEER_LOST = 4  # a multi-worker peer vanished: restart all workers to resume
EXIT_PREEMPTED = sigterm.EXIT_CODE  # 143: progress is saved, rerun the same command

# One flag per config field, its help written in trainer/config.py.
CONFIG_FLAGS = cli.define_config_flags(extra_help={
    "experiment": "One of " + ", ".join(experiments.PRESETS) + ".",
}, module_name=__name__)
flags.DEFINE_bool("print_config", False, "Print the resolved configuration as JSON and exit.")

FLAGS = flags.FLAGS


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
    given = cli.given_values(flag_values, CONFIG_FLAGS)
    return checks.resolve(experiments.configure(flag_values.experiment, given))


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
    except distribute.PeerLost as e:
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
