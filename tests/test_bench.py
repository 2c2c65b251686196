"""The benchmark measures what it says, and every ratio it prints can be checked from its figures.

Speeds are never asserted: they belong to the machine, not to the code. The
command runs in a subprocess because it defines its own absl flags, as
trainer.main does, and both cannot live in one process.
"""

import dataclasses
import json
import logging
import math
import os
import re
import subprocess
import sys

import pytest

from trainer import config as config_lib
from trainer.bench import Settings, run, scenarios, timing, trainer_config
from trainer.bench import report as report_lib
from trainer.config import UserError
from trainer.data import sources

TINY_PHOTOS = scenarios.Scenario("tiny", "tiny photos", train_images=8, width=40, height=30,
                                 image_size=16, first_epoch_target=None)
TINY_SETTINGS = Settings(
    trainer=config_lib.override(config_lib.Config(), {
        "backbone": "wide_resnet", "weights": "none", "bit_variant": "s-r50x1",
        "image_size": 16, "batch_size": 4, "seed": 0}),
    scenarios=("flowers",), images=8, train_steps=2, round_steps=1, epoch_images=4,
    out="unused")
# A ratio row: label, reference figure, trainer figure, ratio.
RATIO_ROW = re.compile(r"^  (\S.*?)\s+([\d.e+-]+)\s+([\d.e+-]+)\s+([\d.]+)x")
TOTALS = re.compile(r"= (\d+) images in ([\d.e+-]+) s and (\d+) images in ([\d.e+-]+) s")


@pytest.mark.parametrize("backbone, target", [
    ("resnet50", 1.7), ("bit", 1.25), ("wide_resnet", None), ("resnet50_hub", None), ("hub", None)])
def test_the_throughput_target_is_the_backbones_own(backbone, target):
    # No target for a SavedModel (it keeps float32 whatever the policy), nor for a
    # backbone never measured against one (wide_resnet).
    found = report_lib.targets({"scenarios": {}, "settings": {"backbone": backbone}, "train": {}})
    assert [t[3] for t in found if t[0] == "train.throughput"] == ([target] if target else [])


def test_cache_memory_is_measured_from_the_pipelines_images(tmp_path):
    """Each side's cache bytes are those of the images its pipeline really delivers: uint8
    at the input size for the trainer, float32 for the recipe, plus an int64 label each."""
    scenarios.write_photos(str(tmp_path), TINY_PHOTOS, seed=0)
    config = trainer_config(TINY_SETTINGS, TINY_PHOTOS, str(tmp_path), TINY_PHOTOS.train_images + 1)

    figures = timing.time_input(config)

    pixels, label_bytes = 16 * 16 * 3, 8
    cache = figures["cache_memory"]
    assert figures["train_images"] == 8
    assert cache["trainer_bytes"] == 8 * (pixels + label_bytes)
    assert cache["reference_bytes"] == 8 * (4 * pixels + label_bytes)
    assert cache["ratio"] == cache["trainer_bytes"] / cache["reference_bytes"]
    # Three interleaved repeats: one epoch of each side each time, three cached epochs.
    assert figures["first_epoch"]["trainer_images"] == 3 * 8
    assert figures["later_epoch"]["trainer_images"] == 3 * timing.CACHED_EPOCHS * 8


def test_a_sweep_decodes_once_in_the_trainers_runs_and_in_every_reference_run(tmp_path, caplog):
    scenarios.write_photos(str(tmp_path / "photos"), TINY_PHOTOS, seed=0)
    config = trainer_config(TINY_SETTINGS, TINY_PHOTOS, str(tmp_path / "photos"),
                            TINY_PHOTOS.train_images + 1)

    with caplog.at_level(logging.INFO, logger="absl"):
        figures = timing.time_sweep(config, 3, str(tmp_path / "cache"))

    runs = figures["all_runs"]
    assert figures["runs"] == 3 and len(figures["trainer_setup_seconds"]) == 3
    assert runs["reference_images"] == runs["trainer_images"] == 3 * 8
    assert len(runs["trainer_runs_images_per_sec"]) == 3
    # One cache entry of the training split, written by the first run alone.
    assert [n for n in os.listdir(tmp_path / "cache") if not n.startswith(".")] == [
        f"train-0of1-{pipeline_fingerprint(config)}"]
    assert caplog.text.count("Writing the cache") == 1
    found = report_lib.targets({"scenarios": {"sweep": {**dataclasses.asdict(
        scenarios.SCENARIOS["sweep"]), "input": figures}}, "settings": {"backbone": "wide_resnet"},
        "train": {}})
    assert found == [("sweep.all_runs", ("scenarios", "sweep", "input", "all_runs", "ratio"),
                      ">=", 4.0)]


def pipeline_fingerprint(config):
    return sources.create_data_source(config.data, config.seed).fingerprint


def test_a_ratio_is_the_ratio_of_the_two_totals_beside_it():
    reference, trainer = timing.Runs(), timing.Runs()
    for images, seconds in ((16, 1.0), (16, 3.0)):
        reference.add(images, seconds)
    for images, seconds in ((16, 1.0), (16, 1.0)):
        trainer.add(images, seconds)
    figures = timing.compare(reference, trainer)
    assert figures["reference_images_per_sec"] == 8.0 and figures["trainer_images_per_sec"] == 16.0
    assert figures["ratio"] == 2.0
    assert figures["reference_runs_images_per_sec"] == [16.0, 16 / 3]
    assert figures["median_run_ratio"] == pytest.approx((1.0 + 3.0) / 2)


def test_generated_photos_have_the_scenario_size_and_one_image_for_validation(tmp_path):
    from PIL import Image

    scenarios.write_photos(str(tmp_path), TINY_PHOTOS, seed=0)
    files = sorted(tmp_path.glob("class_*/*.jpg"))
    assert len(files) == TINY_PHOTOS.train_images + 1
    with Image.open(files[0]) as image:
        assert image.size == (40, 30) and image.format == "JPEG"


def test_bad_settings_name_their_flag_before_anything_is_written(tmp_path):
    with pytest.raises(UserError, match="--scenarios=nope"):
        run(dataclasses.replace(TINY_SETTINGS, scenarios=("nope",), out=str(tmp_path)), "cmd")
    with pytest.raises(UserError, match="--epoch_images=8"):
        run(dataclasses.replace(TINY_SETTINGS, epoch_images=8, out=str(tmp_path)), "cmd")
    assert not list(tmp_path.iterdir())
    scenarios.write_photos(str(tmp_path / "mine"), TINY_PHOTOS, seed=0)  # 9 images
    with pytest.raises(UserError, match="--image_dir=.* has 9 usable images.*need 11"):
        mine = config_lib.override(TINY_SETTINGS.trainer, {"image_dir": str(tmp_path / "mine")})
        run(dataclasses.replace(TINY_SETTINGS, trainer=mine, images=None, epoch_images=5,
                                out=str(tmp_path / "out")), "cmd")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_tiny_benchmark_prints_ratios_a_reader_can_check(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trainer.bench", "--backbone=wide_resnet", "--image_size=16",
         "--batch_size=4", "--images=20", "--epoch_images=4", "--train_steps=2",
         "--scenarios=flowers,sweep", f"--out={tmp_path}"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())

    lines = result.stdout.splitlines()
    rows = [(RATIO_ROW.match(line), lines[i + 1]) for i, line in enumerate(lines[:-1])
            if RATIO_ROW.match(line)]
    assert [row[1] for row, _ in rows] == [
        "first epoch (images/s)", "later epochs (images/s; trainer cached)",
        "cache memory (MB; float32 vs the trainer's)", "6 runs, one epoch each (images/s)",
        "throughput (images/s)",
        "peak RSS (MB; a fresh process each)"]
    for row, below in rows:
        reference, trainer, ratio = float(row[2]), float(row[3]), float(row[4])
        # Five significant digits per figure, two decimals per ratio.
        assert abs(trainer / reference - ratio) <= 0.005 + 2e-4 * ratio, row[0]
        totals = TOTALS.search(below)
        if totals:  # images/s figures: all images over all seconds of the runs
            assert int(totals[1]) / float(totals[2]) == pytest.approx(reference, rel=2e-3)
            assert int(totals[3]) / float(totals[4]) == pytest.approx(trainer, rel=2e-3)
    assert sum(bool(TOTALS.search(below)) for _, below in rows) == 4

    flowers = report["scenarios"]["flowers"]["input"]
    for key in ("first_epoch", "later_epoch"):
        figures = flowers[key]
        assert figures["trainer_images_per_sec"] == pytest.approx(
            figures["trainer_images"] / figures["trainer_seconds"])
        assert figures["ratio"] == pytest.approx(
            figures["trainer_images_per_sec"] / figures["reference_images_per_sec"])
    assert flowers["train_images"] == 20
    assert [row["train_images"] for row in report["epochs"]["sizes"]] == [4, 8]
    throughput = report["train"]["throughput"]
    assert math.isfinite(throughput["ratio"]) and len(throughput["trainer_runs_images_per_sec"]) == 2
    # Not the recipe's backbone: the reference is the trainer's own network at its settings.
    assert "overhead" not in report["train"] and "wide_resnet network" in report["reference"]
    trainer = report["trainer"]
    assert trainer["precision"] in ("float32", "mixed_bfloat16", "mixed_float16")
    assert trainer["steps_per_execution"] == 1 and trainer["steps_per_execution_reason"]
    assert set(report["targets"]) == {"flowers.first_epoch", "flowers.later_epoch",
                                      "flowers.cache_memory", "sweep.all_runs"}
    sweep = report["scenarios"]["sweep"]["input"]["all_runs"]
    assert sweep["trainer_images"] == sweep["reference_images"] == 6 * 20
    assert sweep["ratio"] == pytest.approx(
        sweep["trainer_images_per_sec"] / sweep["reference_images_per_sec"])
    assert report["memory"]["trainer_peak_rss_bytes"] > 0
