"""The benchmark: the trainer against the reference recipe, side by side, on this hardware.

  python -m trainer.bench                       # every scenario, resnet50
  python -m trainer.bench --backbone=wide_resnet --scenarios=flowers
  python -m trainer.bench --scenarios=sweep     # six runs over the same images

Measures, per scenario (scenarios.py), the input pipelines' images/sec in the
first and in later epochs and the memory a cache of their images takes (or, for
a sweep, over several runs of one epoch each); on the first scenario, training images/sec after warm-up, the trainer's own overhead,
peak resident memory of each side and time per epoch at two data sizes. Prints
a table (report.py) and writes bench.json with every raw figure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

import tf_keras as keras
from absl import logging

from trainer import checks
from trainer import config as config_lib
from trainer.bench import report as report_lib
from trainer.bench import scenarios as scenarios_lib
from trainer.bench import timing
from trainer.config import Config, UserError
from trainer.data import folders, pipeline

BENCH_FILE = "bench.json"


# The trainer's flags the benchmark takes (same names and help), with the defaults of
# the reference recipe's scratch run: ResNet50, random weights (works offline).
TRAINER_FIELDS = ("backbone", "weights", "hub_handle", "bit_variant", "bit_weights",
                  "image_size", "global_batch_size", "image_dir", "seed")
TRAINER_DEFAULTS = {"backbone": "resnet50", "weights": "none", "image_size": None}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The benchmark's command line: the trainer's model and data flags, and its own."""

    # TRAINER_FIELDS as given (the rest are Config's defaults): image_size None
    # means each scenario's own; image_dir a folder measured instead of the scenarios.
    trainer: Config
    scenarios: tuple[str, ...]  # names in scenarios.SCENARIOS; the first is also trained on
    images: int | None  # training images per scenario; None: each scenario's own
    train_steps: int  # timed, per side
    round_steps: int  # per side per turn
    epoch_images: int  # training images of the smaller timed epoch
    out: str  # directory of bench.json

    @property
    def batch_size(self) -> int:
        return self.trainer.data.global_batch_size

    def as_dict(self) -> dict[str, Any]:
        """Every setting by its flag name, for bench.json."""
        flat = config_lib.flatten(self.trainer)
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "trainer"}
        return {**{config_lib.flag_name(name): flat[name] for name in TRAINER_FIELDS}, **own}

    def check(self, training: scenarios_lib.Scenario) -> None:
        """Raises UserError naming the flag of the first invalid value."""
        problems = [
            (training.train_images >= 2 * self.epoch_images,
             f"--epoch_images={self.epoch_images} needs at least {2 * self.epoch_images} "
             f"training images in the {training.name} scenario, which has "
             f"{training.train_images}; lower --epoch_images or raise --images."),
            (self.epoch_images >= self.batch_size,
             f"--epoch_images={self.epoch_images} must be at least "
             f"--batch_size={self.batch_size}."),
            # Then the trainer's first step reads the whole split into its cache
            # (its shuffle buffer fills first), and every later turn reads the cache.
            (training.train_images < pipeline.SHUFFLE_BUFFER,
             f"--images={training.train_images} is more than the trainer's shuffle buffer "
             f"({pipeline.SHUFFLE_BUFFER} images); use fewer."),
            (self.train_steps >= 1, f"--train_steps must be at least 1, got {self.train_steps}."),
            (self.round_steps >= 1 and self.train_steps % self.round_steps == 0,
             f"--round_steps={self.round_steps} must divide --train_steps={self.train_steps}."),
        ]
        for ok, message in problems:
            if not ok:
                raise UserError(message)


def trainer_config(settings: Settings, scenario: scenarios_lib.Scenario, folder: str,
                   num_files: int) -> Config:
    """The trainer's configuration as a user runs it on a scenario's folder (auto choices).

    The backbone is trained, as in the recipe's runs that train it (a frozen
    backbone would time the head alone).
    """
    values = {
        "trainable": True, "image_size": scenario.image_size, "image_dir": folder,
        # Nothing is evaluated, but a DataSource needs a validation split: one image.
        "val_fraction": 1 / num_files,
    }
    return checks.resolve(config_lib.override(settings.trainer, values))


def run(settings: Settings, command: str) -> dict[str, Any]:
    """Runs every measurement; returns the report (also written to --out/bench.json).

    Raises:
      UserError: a bad setting or image folder; names the flag.
    """
    given = settings.trainer
    chosen = scenarios_lib.resolve(settings.scenarios, given.data.image_dir, settings.images,
                                   given.data.image_size)
    settings.check(chosen[0])
    keras.utils.set_random_seed(given.seed)
    report: dict[str, Any] = {"command": command,
                              "hardware": report_lib.hardware_info(),
                              "settings": settings.as_dict(),
                              "reference": report_lib.describe_reference(given.model.backbone),
                              "scenarios": {}}
    logging.info("Hardware: %s", report["hardware"])
    with tempfile.TemporaryDirectory(prefix="trainer-bench-") as workdir:
        configs, files = {}, {}
        for scenario in chosen:
            logging.info("Scenario %s: writing or linking %d images.", scenario.name,
                         scenario.train_images + 1)
            folder = scenarios_lib.prepare(scenario, given.data.image_dir, workdir, given.seed)
            paths, _, _ = folders.list_image_folder(folder)
            files[scenario.name] = {"files": len(paths),
                                    "mean_file_bytes": scenarios_lib.read_files(paths) / len(paths)}
            configs[scenario.name] = trainer_config(settings, scenario, folder, len(paths))
        needed = 2 * settings.epoch_images + 1  # the larger timed epoch and a validation image
        if files[chosen[0].name]["files"] < needed:
            raise UserError(f"--image_dir={given.data.image_dir} has {files[chosen[0].name]['files']}"
                            f" usable images; the timed epochs need {needed}. Lower "
                            "--epoch_images.")

        # Built before the input timing, so that a model that cannot be loaded
        # (weights, a hub handle offline) stops the run within a minute.
        training = chosen[0]
        config = configs[training.name]
        report["training_scenario"] = training.name
        names = timing.side_names(given.model.backbone)
        logging.info("Training on %s: building %s.", training.name, ", ".join(names))
        sides = [timing.create_side(name, config) for name in names]
        trainer = sides[names.index("trainer")]
        report["trainer"] = {**dataclasses.asdict(trainer.compute), "strategy": trainer.strategy,
                             "replicas": trainer.replicas}

        for scenario in chosen:
            logging.info("Scenario %s: input pipelines.", scenario.name)
            timing.settle()
            if scenario.runs == 1:
                figures = timing.time_input(configs[scenario.name])
            else:
                figures = timing.time_sweep(configs[scenario.name], scenario.runs,
                                            os.path.join(workdir, f"{scenario.name}-cache"))
            report["scenarios"][scenario.name] = {
                **dataclasses.asdict(scenario), **files[scenario.name], "input": figures}

        logging.info("Training on %s: tracing and timing.", training.name)
        timing.settle()
        report["train"] = timing.time_training(sides, settings.train_steps, settings.round_steps)

        logging.info("Epoch time for %d and %d training images.",
                     settings.epoch_images, 2 * settings.epoch_images)
        paths, _, _ = folders.list_image_folder(config.data.image_dir)
        report["epochs"] = timing.time_epochs(
            trainer, config, paths, (settings.epoch_images, 2 * settings.epoch_images), workdir)

        logging.info("Peak memory: one fresh process per side.")
        report["memory"] = timing.measure_memory(config)
    report["targets"] = report_lib.check_targets(report)
    os.makedirs(settings.out, exist_ok=True)
    path = os.path.join(settings.out, BENCH_FILE)
    with open(path, "w") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    logging.info("Wrote %s.", path)
    return report
