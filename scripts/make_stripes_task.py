#!/usr/bin/env python
"""Writes a synthetic stripes-orientation task as an --image_dir: the data of README's transfer evidence.

  python scripts/make_stripes_task.py --task=source --examples_per_class=300 --out=data/source
  python scripts/make_stripes_task.py --task=target --examples_per_class=60 --out=data/target

Each image is noisy sinusoidal stripes; the class is their orientation. Colour,
frequency and phase are random per image, so only orientation tells the class.
`source` has stripes at 0, 36, 72, 108 and 144 degrees; `target` at 18, 54,
90, 126 and 162: five orientations the source never shows, each halfway
between two that it does. A related task, not the same one.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags
from PIL import Image

CLASSES = 5
TASK_OFFSET_DEG = {"source": 0, "target": 18}  # added to 0, 36, 72, 108, 144 degrees
FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the script's flags (only when run: importing it defines none)."""
    flags.DEFINE_enum("task", None, list(TASK_OFFSET_DEG), "source (pretraining) or target task.")
    flags.DEFINE_string("out", None, "Folder to write: one sub-folder of PNGs per class.")
    flags.DEFINE_integer("examples_per_class", 60, "Images per class.", lower_bound=1)
    flags.DEFINE_integer("image_size", 32, "Square image size, pixels.", lower_bound=8)
    flags.DEFINE_integer("seed", None, "Random seed; default 1 for source, 2 for target.")
    flags.mark_flags_as_required(["task", "out"])


def class_angles(task: str) -> list[int]:
    """The stripes' orientation of each class, degrees in [0, 180)."""
    return [TASK_OFFSET_DEG[task] + 180 * k // CLASSES for k in range(CLASSES)]


def stripes(angles_deg: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Noisy stripes at the given orientations, random colour: uint8 [n, size, size, 3]."""
    n = len(angles_deg)
    angle = np.deg2rad(angles_deg) + rng.normal(0.0, 0.05, n)  # a little jitter
    frequency = rng.uniform(2.0, 4.0, n)  # stripes per image
    phase = rng.uniform(0.0, 2 * np.pi, n)
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
    along = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy
    wave = np.sin(2 * np.pi * frequency[:, None, None] * along + phase[:, None, None])
    tint = rng.uniform(-1.0, 1.0, (n, 1, 1, 3))  # per channel: contrast and sign
    images = 128 + 80 * wave[..., None] * tint + rng.normal(0.0, 20.0, (n, image_size, image_size, 3))
    return np.clip(images, 0, 255).astype(np.uint8)


def write_task(out_dir: str, task: str, examples_per_class: int, image_size: int,
               seed: int) -> list[str]:
    """Writes out_dir/stripes_<angle>deg/<i>.png; returns the class folder names."""
    rng = np.random.default_rng(seed)
    angles = class_angles(task)
    labels = np.repeat(np.arange(CLASSES), examples_per_class)
    images = stripes(np.array(angles)[labels], image_size, rng)
    names = [f"stripes_{angle:03d}deg" for angle in angles]
    for name in names:
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(os.path.join(out_dir, names[label], f"{i:05d}.png"))
    return names


def main(argv: list[str]) -> None:
    del argv  # every option is a flag
    seed = FLAGS.seed if FLAGS.seed is not None else list(TASK_OFFSET_DEG).index(FLAGS.task) + 1
    names = write_task(FLAGS.out, FLAGS.task, FLAGS.examples_per_class, FLAGS.image_size, seed)
    sys.stdout.write(f"Wrote {FLAGS.examples_per_class} images per class to {FLAGS.out}: "
                     f"{', '.join(names)}\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
