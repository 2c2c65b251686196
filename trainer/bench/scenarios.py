"""Benchmark scenarios: the image folders both sides read (generated photos or a user's folder).

A generated scenario writes JPEGs whose decode cost is a photo's: smooth colour
fields plus sensor-like noise, saved at quality 90 with 4:2:0 chroma, as cameras
and phones save them (flat or pure-noise images would decode far faster or slower).
Each has one extra image, the validation split every trainer data source holds,
so that its training split fills whole batches.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

import numpy as np
from PIL import Image

from trainer.config import UserError
from trainer.data import folders

GENERATED_CLASSES = 5  # as tf_flowers
NOISE_GREY_LEVELS = 8.0  # standard deviation of the sensor-like noise
JPEG_QUALITY = 90  # what cameras and phones use
COARSE_FIELD = (12, 16)  # colour-field control points (rows, columns), smoothly interpolated


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A set of training images and the size the model takes them at."""

    name: str
    description: str
    train_images: int  # in the training split (one more image is the validation split)
    width: int  # pixels of each generated photo; 0 for a user's folder
    height: int  # pixels
    image_size: int  # model input, pixels (square)
    first_epoch_target: float | None  # trainer / reference images/s of the first epoch
    # 1: one run's first and later epochs are measured. More: a sweep, that many
    # runs of one epoch each over the same images (timing.time_sweep).
    runs: int = 1
    sweep_target: float | None = None  # trainer / reference images/s over all the runs


# Targets restated from what decoding allows on a 2-core AVX512-BF16 CPU (docs/benchmark.md):
# entropy decoding, the same work on both sides, takes most of a decode at any DCT scale.
SCENARIOS = {
    "flowers": Scenario("flowers", "tf_flowers-like photos", train_images=512, width=500,
                        height=375, image_size=128, first_epoch_target=1.15),
    "phone": Scenario("phone", "12-megapixel phone photos", train_images=64, width=4032,
                      height=3024, image_size=224, first_epoch_target=1.35),
    # scripts/run_experiments.sh's six runs: only the trainer's first run decodes. Near
    # tf_flowers' 2,569 training images (below the shuffle buffer): each run's fixed
    # cost of starting its pipeline (tenths of a second) would weigh on a small set.
    "sweep": Scenario("sweep", "tf_flowers-like photos", train_images=2000, width=500,
                      height=375, image_size=128, first_epoch_target=None, runs=6,
                      sweep_target=4.0),
}
IMAGE_DIR_SCENARIO = "image_dir"  # the name of a scenario made from --image_dir


def resolve(names: tuple[str, ...], image_dir: str | None, images: int | None,
            image_size: int | None) -> list[Scenario]:
    """The scenarios to measure, with --images and --image_size applied to each.

    Raises:
      UserError: an unknown scenario name; names --scenarios.
    """
    if image_dir:
        return [Scenario(IMAGE_DIR_SCENARIO, f"images from {image_dir}", images or 512, 0, 0,
                         image_size or SCENARIOS["flowers"].image_size, None)]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        raise UserError(f"--scenarios={','.join(names)} is not valid; give one or more of "
                        f"{', '.join(SCENARIOS)}, separated by commas.")
    return [dataclasses.replace(SCENARIOS[name],
                                train_images=images or SCENARIOS[name].train_images,
                                image_size=image_size or SCENARIOS[name].image_size)
            for name in names]


NOISE_MARGIN = 64  # pixels; each photo takes its noise from a shifted window of one field


def write_photo(path: str, width: int, height: int, noise: np.ndarray, seed: int) -> None:
    """Writes one photo-like JPEG of `width` x `height` pixels.

    Args:
      noise: int16 noise of at least (height, width) + NOISE_MARGIN; a window of
        it at a random offset is added (decoding cost is the same as fresh noise's).
    """
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (*COARSE_FIELD, 3)).astype(np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
    top, left = rng.integers(0, NOISE_MARGIN, 2)
    pixels += noise[top:top + height, left:left + width]
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        path, quality=JPEG_QUALITY, subsampling="4:2:0")


def write_photos(directory: str, scenario: Scenario, seed: int) -> None:
    """Writes the scenario's training images plus one, in class folders."""
    paths = []
    for i in range(scenario.train_images + 1):
        class_dir = os.path.join(directory, f"class_{i % GENERATED_CLASSES}")
        os.makedirs(class_dir, exist_ok=True)
        paths.append(os.path.join(class_dir, f"{i:05d}.jpg"))
    shape = (scenario.height + NOISE_MARGIN, scenario.width + NOISE_MARGIN, 3)
    noise = np.round(NOISE_GREY_LEVELS * np.random.default_rng(seed).standard_normal(
        shape, np.float32)).astype(np.int16)
    # numpy's array arithmetic and PIL's encoder release the GIL: threads use every core.
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(lambda i: write_photo(paths[i], scenario.width, scenario.height, noise,
                                            seed * 1_000_003 + i), range(len(paths))))


def link_subset(paths: list[str], directory: str, count: int) -> str:
    """Makes an image folder of `count` of `paths` (symlinks), spread evenly over them.

    `paths` are grouped by class (as folders.list_image_folder returns them), so
    every class keeps its share.
    """
    for index in np.linspace(0, len(paths) - 1, count).round().astype(int):
        path = paths[index]
        class_dir = os.path.join(directory, os.path.basename(os.path.dirname(path)))
        os.makedirs(class_dir, exist_ok=True)
        os.symlink(os.path.abspath(path), os.path.join(class_dir, os.path.basename(path)))
    return directory


def prepare(scenario: Scenario, image_dir: str | None, workdir: str, seed: int) -> str:
    """Returns the scenario's folder under `workdir`: generated photos, or a subset of
    --image_dir of `train_images` + 1 images (fewer if it has fewer)."""
    folder = os.path.join(workdir, scenario.name)
    if scenario.name == IMAGE_DIR_SCENARIO:
        paths, _, _ = folders.list_image_folder(image_dir)
        return link_subset(paths, folder, min(scenario.train_images + 1, len(paths)))
    write_photos(folder, scenario, seed)
    return folder


def read_files(paths: list[str]) -> int:
    """Reads every file once, so that neither side pays for a cold disk; returns their bytes."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            total += len(f.read())
    return total
