"""The official BiT weight files (.npz): their address, download into the Keras cache, check and load.

The authors publish one .npz file per variant (BiT-S and BiT-M, each
architecture); arrays are keyed by layer path under `resnet/`. A file is
checked against the network of --bit_variant from the .npy headers alone,
before any data is read, and every array but the pretrained head is loaded
into its variable. No TensorFlow at import time (get_file is imported when a
download is needed). docs/bit.md covers using the files offline.
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import TYPE_CHECKING, Mapping, Sequence
from urllib.parse import urlsplit

import numpy as np

from trainer import backbones
from trainer.backbones.bit import Architecture, architecture
from trainer.config import ModelConfig, UserError
from trainer.preflight import LocalProblem, Need, Remote

if TYPE_CHECKING:
    import tensorflow as tf

WEIGHTS_URL = "https://storage.googleapis.com/bit_models/{name}.npz"
NPZ_PREFIX = "resnet/"  # every array of an official file is under it
# The pretrained classifier (1000 or 21843 classes): present in the files, dropped here.
HEAD_KEYS = ("resnet/head/conv2d/kernel", "resnet/head/conv2d/bias")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # the first 8 bytes of every .h5 file


def official_name(variant: str) -> str:
    """The authors' name of a --bit_variant: "m-r50x1" -> BiT-M-R50x1."""
    dataset, arch = variant.split("-", 1)
    return f"BiT-{dataset.upper()}-R{arch[1:]}"


def official_url(variant: str) -> str:
    """The authors' .npz file of a --bit_variant: "m-r50x1" -> .../BiT-M-R50x1.npz."""
    return WEIGHTS_URL.format(name=official_name(variant))


def npz_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """The arrays an official file of `arch` holds, head excluded: path -> shape."""
    width = arch.root_width
    shapes = {f"{NPZ_PREFIX}root_block/standardized_conv2d/kernel": (7, 7, 3, width)}
    channels = width
    for block, units in enumerate(arch.units_per_block, start=1):
        bottleneck = width * 2 ** (block - 1)
        for unit in range(1, units + 1):
            prefix = f"{NPZ_PREFIX}block{block}/unit{unit:02d}"
            if unit == 1:
                shapes[f"{prefix}/a/proj/standardized_conv2d/kernel"] = (
                    1, 1, channels, 4 * bottleneck)
            for part, size, kernel in (("a", channels, (1, 1, channels, bottleneck)),
                                       ("b", bottleneck, (3, 3, bottleneck, bottleneck)),
                                       ("c", bottleneck, (1, 1, bottleneck, 4 * bottleneck))):
                shapes[f"{prefix}/{part}/group_norm/gamma"] = (size,)
                shapes[f"{prefix}/{part}/group_norm/beta"] = (size,)
                shapes[f"{prefix}/{part}/standardized_conv2d/kernel"] = kernel
            channels = 4 * bottleneck
    shapes[f"{NPZ_PREFIX}group_norm/gamma"] = (channels,)
    shapes[f"{NPZ_PREFIX}group_norm/beta"] = (channels,)
    return shapes


def _weights_error(source: str, problem: str, arch: Architecture, variant: str) -> UserError:
    return UserError(
        f"--bit_weights={source}: {problem}. The native BiT loads the authors' .npz files "
        f"(for --bit_variant={variant}, BiT {arch.name()}: {official_url(variant)}); pass "
        "that file's path or URL, choose the --bit_variant of the file, or use "
        "--bit_weights=none for random initialisation.")


def _looks_like(keys: Sequence[str], shapes: dict[str, tuple[int, ...]]) -> str:
    """What architecture a file's keys and root kernel describe, e.g. " (the file looks like R101x1)"."""
    units: dict[int, int] = {}
    for key in keys:
        match = re.match(rf"{NPZ_PREFIX}block(\d)/unit(\d+)/", key)
        if match:
            block, unit = int(match.group(1)), int(match.group(2))
            units[block] = max(units.get(block, 0), unit)
    root = shapes.get(f"{NPZ_PREFIX}root_block/standardized_conv2d/kernel")
    if sorted(units) != [1, 2, 3, 4] or root is None or len(root) != 4:
        return ""
    found = Architecture(tuple(units[b] for b in (1, 2, 3, 4)), root[-1])
    return f" (the file looks like {found.name()})"


def read_npz_shapes(path: str, source: str, variant: str) -> dict[str, tuple[int, ...]]:
    """The shape of every array in an .npz file, read from the headers alone.

    Raises:
      UserError: not an .npz file (an .h5 file is named as such).
    """
    arch = architecture(variant)
    with open(path, "rb") as f:
        head = f.read(len(HDF5_SIGNATURE))
    if head == HDF5_SIGNATURE:
        raise _weights_error(source, "this is an HDF5 (.h5) file; the authors' .h5 files "
                             "only fit their own Keras model", arch, variant)
    shapes = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise ValueError(f"it holds {info.filename}, not an .npy array")
                with archive.open(info) as member:
                    major, _ = np.lib.format.read_magic(member)
                    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(member)
                if dtype.kind != "f":
                    raise ValueError(f"{info.filename} holds {dtype}, not floating-point numbers")
                shapes[info.filename[:-len(".npy")]] = tuple(shape)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        partial = f"; an interrupted download does this: delete {path} and retry" if (
            "://" in source) else ""
        raise _weights_error(source, f"not an .npz file of arrays ({e}{partial})", arch,
                             variant) from None
    return shapes


def check_npz(path: str, source: str, variant: str) -> None:
    """Checks that the file maps one to one onto the network of `variant` (head aside).

    Raises:
      UserError: naming --bit_weights and the first missing, unused or misshapen key.
    """
    arch = architecture(variant)
    found = read_npz_shapes(path, source, variant)
    expected = npz_shapes(arch)
    looks_like = _looks_like(list(found), found)
    for key, shape in expected.items():
        if key not in found:
            raise _weights_error(source, f"the file has no array {key}{looks_like}", arch,
                                 variant)
        if found[key] != shape:
            raise _weights_error(source, f"the array {key} has shape {found[key]}, BiT "
                                 f"{arch.name()} needs {shape}{looks_like}", arch, variant)
    for key in found:
        if key not in expected and key not in HEAD_KEYS:
            raise _weights_error(source, f"no layer of BiT {arch.name()} uses the array "
                                 f"{key}{looks_like}", arch, variant)


def _source(config: ModelConfig) -> str:
    """--bit_weights, or the official file's URL when it is not given."""
    return config.bit_weights or official_url(config.bit_variant)


def _file_name(source: str) -> str:
    return os.path.basename(urlsplit(source).path) or "bit_weights.npz"


def _cache_dir() -> str:
    # $KERAS_HOME as Keras' own config uses it (the Kubernetes Jobs point it at
    # the data volume); tf_keras' get_file itself only knows ~/.keras.
    return os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")


def _offline_way(file_name: str) -> str:
    return (f"Offline, download {file_name} on a connected machine, copy it here and pass "
            f"--bit_weights=/path/to/{file_name} (or --bit_weights=none for random "
            "initialisation).")


def needs(config: ModelConfig) -> list[Need]:
    """What --bit_weights needs before the run starts (see trainer/preflight.py): a local
    file that fits the network of --bit_variant (headers read), or the download of a URL
    the Keras cache does not hold yet."""
    if config.bit_weights == "none":
        return []
    source = _source(config)
    if "://" not in source:
        try:
            check_npz(_local_file(source), source, config.bit_variant)
        except UserError as e:
            return [LocalProblem("--bit_weights", str(e))]
        return []
    file_name = _file_name(source)
    if backbones.keras_cached_file(file_name, _cache_dir()):
        return []
    return [Remote("--bit_weights", f"the BiT weights {file_name}", source,
                   _offline_way(file_name))]


def _local_file(source: str) -> str:
    if not os.path.isfile(source):
        raise UserError(f"--bit_weights={source} is not a file; pass the path or URL of "
                        "a BiT .npz file, or none for random initialisation.")
    return source


def weights_path(config: ModelConfig) -> str:
    """The local .npz file of --bit_weights, downloaded once into the Keras cache
    ($KERAS_HOME or ~/.keras, under models/) if a URL.

    Raises:
      UserError: a local path is not a file, or the download failed (offline).
    """
    source = _source(config)
    if "://" not in source:
        return _local_file(source)
    file_name = _file_name(source)
    cache_dir = _cache_dir()
    try:
        # get_file falls back to /tmp/.keras, which the OS empties, when the directory is missing.
        os.makedirs(cache_dir, exist_ok=True)
    except OSError:
        pass  # a read-only home: /tmp/.keras it is
    import tf_keras as keras  # only to download

    try:
        return keras.utils.get_file(file_name, origin=source,
                                    cache_subdir=backbones.KERAS_CACHE_SUBDIR,
                                    cache_dir=cache_dir)
    except Exception as e:  # get_file raises plain Exception for every fetch failure
        raise UserError(
            f"--bit_weights: the BiT weights {source} could not be downloaded "
            f"({str(e).splitlines()[0][:200]}). {_offline_way(file_name)}") from None


def checked_weights_path(config: ModelConfig) -> str:
    """The local .npz file of --bit_weights (downloaded once), checked against --bit_variant.

    Raises:
      UserError: naming --bit_weights; see `weights_path` and `check_npz`.
    """
    path = weights_path(config)
    check_npz(path, _source(config), config.bit_variant)
    return path


def check_source(config: ModelConfig) -> None:
    """Fails fast, before any data is read, on --bit_weights that cannot be loaded.

    Raises:
      UserError: naming --bit_weights; see `checked_weights_path`.
    """
    if config.bit_weights != "none":
        checked_weights_path(config)


def load_weights(variables: Mapping[str, tf.Variable], path: str) -> None:
    """Assigns every array of a checked .npz file (head aside) to its variable.

    Args:
      variables: the network's variables by their path in the file
        (`bit_network.npz_variables`).
      path: a file `check_npz` accepted for that network.
    """
    with np.load(path, allow_pickle=False) as arrays:
        for key, variable in variables.items():
            variable.assign(arrays[key])
