#!/usr/bin/env python
"""Writes scikit-learn's handwritten digits (1,797 scans of 8x8 pixels) as an --image_dir.

  pip install scikit-learn      # only for this script: not a dependency of the trainer
  python scripts/write_digits.py runs/digits/data

One sub-folder per digit (`0` ... `9`) of greyscale PNGs. The scans have 17
grey levels (0 to 16), stretched here to 0 to 255. Real data no one here made:
the test set of the UCI "Optical Recognition of Handwritten Digits" dataset,
which scikit-learn ships.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image

GREY_LEVELS = 16  # the scans' maximum value


def write_digits(out: str) -> int:
    """Writes the PNG folders under `out`; returns the number of images."""
    from sklearn.datasets import load_digits  # imported here: only this script needs it

    digits = load_digits()
    pixels = np.round(digits.images * (255 / GREY_LEVELS)).astype(np.uint8)
    for index, (image, label) in enumerate(zip(pixels, digits.target)):
        folder = os.path.join(out, str(label))
        os.makedirs(folder, exist_ok=True)
        # A 2-D uint8 array is a greyscale ("L") image.
        Image.fromarray(image).save(os.path.join(folder, f"{index:04d}.png"))
    return len(pixels)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    count = write_digits(sys.argv[1])
    sys.stderr.write(f"Wrote {count} digit images under {sys.argv[1]}.\n")
