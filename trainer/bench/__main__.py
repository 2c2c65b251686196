"""Command line of the benchmark: absl flags -> Settings -> run -> the printed table.

  python -m trainer.bench --out=.
  python -m trainer.bench --backbone=bit --bit_variant=m-r50x1 --bit_weights=none --image_size=128
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import sys

from absl import app, flags

from trainer import bench, cli
from trainer import config as config_lib
from trainer.bench import Settings, report, run, scenarios
from trainer.config import UserError

TRAINER_FLAGS = cli.define_config_flags(
    bench.TRAINER_FIELDS, defaults=bench.TRAINER_DEFAULTS, extra_help={
        "image_size": "Default here: each scenario's own (flowers 128, phone 224).",
        "image_dir": "Measured instead of the scenarios.",
    }, module_name=__name__)
flags.DEFINE_list("scenarios", list(scenarios.SCENARIOS), "Generated image sets to measure the "
                  "input on: " + ", ".join(
                      f"{s.name} ({s.train_images} {s.description} of {s.width}x{s.height} at "
                      f"{s.image_size} px"
                      + (f"; {s.runs} runs of one epoch each, the trainer's sharing one file "
                         "cache" if s.runs > 1 else "") + ")"
                      for s in scenarios.SCENARIOS.values())
                  + ". Training is timed on the first.")
flags.DEFINE_integer("images", None, "Training images of every scenario (one more is written "
                     "for validation). Default: each scenario's own.")
flags.DEFINE_integer("train_steps", 5, "Timed training steps per side, after one warm-up step.")
flags.DEFINE_integer("round_steps", 1, "Steps one side runs before the next side's turn; "
                     "raise it on GPUs (e.g. 25) so that steps overlap as they do in fit.")
flags.DEFINE_integer("epoch_images", 32, "Training images in the smaller of the two epochs "
                     "timed to show how epoch time grows; the larger has twice as many.")
flags.DEFINE_string("out", ".", "Directory for bench.json.")

FLAGS = flags.FLAGS


def settings_from_flags(flag_values: flags.FlagValues) -> Settings:
    """The benchmark's Settings from its flags."""
    trainer = config_lib.override(config_lib.Config(), {
        name: flag_values[name].value for name in TRAINER_FLAGS})
    own = {f.name: flag_values[f.name].value for f in dataclasses.fields(Settings)
           if f.name != "trainer"}
    return Settings(trainer=trainer, **{**own, "scenarios": tuple(own["scenarios"])})


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; every option is a --flag.")
    # TensorFlow's INFO lines (retracing notes, asset writes) drown the benchmark's.
    std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)
    try:
        command = " ".join(["python -m trainer.bench"] + sys.argv[1:])
        result = run(settings_from_flags(FLAGS), command)
    except UserError as e:
        cli.fail(str(e))
    sys.stdout.write(report.format_table(result))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
