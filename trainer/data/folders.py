"""Image folders on disk: which files are usable images (read from their headers alone), in
one sub-folder per class.

Nothing is decoded here: a header tells empty files, non-images, formats TensorFlow does
not decode and decompression bombs apart from images, and gives each JPEG's size, from
which the decode stage takes its DCT scale (decode.decode_at_known_scales). The data
source of a folder is made in sources.py; trainer.predict checks files the same way.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import logging
from PIL import Image

from trainer.config import UserError
from trainer.data.decode import LOGGED_NAMES

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Formats TensorFlow's decode_image reads (MPO: multi-picture JPEG from cameras).
DECODABLE_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP")
JPEG_FORMATS = ("JPEG", "MPO")  # what TensorFlow's JPEG decoder reads, at a DCT scale
# Decompression-bomb cap: a header announcing more pixels than this is skipped
# before anything is decoded (about 7,000 x 7,000).
MAX_IMAGE_PIXELS = 50_000_000


def check_image_file(path: str) -> str | None:
    """Returns why the file cannot be an image TensorFlow reads safely, or None.

    Reads only the header: empty files, non-images, formats TensorFlow does not
    decode and decompression bombs are caught without decoding anything.
    Whether the rest of the file decodes is TensorFlow's decoder's call (data
    after a JPEG's end, as phones append, is fine; see decode.decode_examples).
    """
    return read_image_header(path)[0]


def read_image_header(path: str) -> tuple[str | None, tuple[int, int]]:
    """Returns (why the file cannot be used or None, as check_image_file says; (height,
    width) when it is a JPEG, else (0, 0)), from the header alone."""
    no_size = (0, 0)
    try:
        if os.path.getsize(path) == 0:
            return "empty file", no_size
        with Image.open(path) as image:
            kind, (width, height) = image.format, image.size
    except Image.DecompressionBombError:
        return f"more than {MAX_IMAGE_PIXELS} pixels", no_size
    except Exception as e:  # PIL raises many types for unreadable files
        return f"not an image ({type(e).__name__})", no_size
    if kind not in DECODABLE_FORMATS:
        return f"{kind} format is not supported", no_size
    if width * height > MAX_IMAGE_PIXELS:
        return f"{width}x{height} is more than {MAX_IMAGE_PIXELS} pixels", no_size
    return None, ((height, width) if kind in JPEG_FORMATS else no_size)


def _class_folders(image_dir: str) -> list[str]:
    return [name for name in sorted(os.listdir(image_dir))
            if not name.startswith(".") and os.path.isdir(os.path.join(image_dir, name))]


def image_folder_problem(image_dir: str) -> str | None:
    """Why --image_dir cannot be an image folder (not a directory, fewer than 2 class
    sub-folders), from its listing alone; None when it may be."""
    if not os.path.isdir(image_dir):
        return f"--image_dir={image_dir} is not a directory."
    try:
        found = _class_folders(image_dir)
    except OSError as e:
        return f"--image_dir={image_dir} cannot be read ({e.strerror})."
    if len(found) < 2:
        return (f"--image_dir={image_dir} must hold at least 2 class sub-folders with images "
                f"({IMAGE_EXTENSIONS}); found {len(found)}: {found}.")
    return None


def list_image_folder(image_dir: str) -> tuple[list[str], list[int], list[str]]:
    """Lists usable images under one sub-folder per class, sorted.

    Returns:
      (paths, labels, class_names) of `scan_image_folder`.
    """
    folder = scan_image_folder(image_dir)
    return folder.paths, folder.labels, folder.class_names


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """The usable images of a folder with one sub-folder per class, as its listing read them."""

    paths: list[str]
    labels: list[int]
    class_names: list[str]
    # int32 [images, 2]: (height, width) of each JPEG from its header, (0, 0) for
    # other formats: the DCT scale to decode each at, known before decoding.
    jpeg_shapes: np.ndarray


def scan_image_folder(image_dir: str) -> ImageFolder:
    """Lists usable images under one sub-folder per class, sorted, reading each header once.

    Hidden files, other extensions and files that fail `check_image_file` are
    left out; the latter with a count in the log.

    Raises:
      UserError: not a directory, or fewer than 2 classes with images; names --image_dir.
    """
    problem = image_folder_problem(image_dir)
    if problem:
        raise UserError(problem)
    class_names, paths, labels, shapes, skipped = [], [], [], [], []
    for name in _class_folders(image_dir):
        class_dir = os.path.join(image_dir, name)
        files = [
            os.path.join(class_dir, f)
            for f in sorted(os.listdir(class_dir))
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
        good, good_shapes = [], []
        for path in files:
            reason, shape = read_image_header(path)
            if reason:
                skipped.append((path, reason))
            else:
                good.append(path)
                good_shapes.append(shape)
        if not good:
            logging.warning("Class folder %s has no usable images; it is left out.", class_dir)
            continue
        paths += good
        shapes += good_shapes
        labels += [len(class_names)] * len(good)
        class_names.append(name)
    if skipped:
        logging.warning(
            "Skipped %d of %d image files that cannot be read; first ones: %s",
            len(skipped), len(skipped) + len(paths),
            "; ".join(f"{p} ({r})" for p, r in skipped[:LOGGED_NAMES]),
        )
    if len(class_names) < 2:
        raise UserError(
            f"--image_dir={image_dir} must hold at least 2 class sub-folders with images "
            f"({IMAGE_EXTENSIONS}); found {len(class_names)}: {class_names}."
        )
    return ImageFolder(paths, labels, class_names, np.array(shapes, np.int32).reshape(-1, 2))
