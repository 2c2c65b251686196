"""Native BiT (Big Transfer): ResNet-v2 with GroupNorm and Weight Standardization, on the official .npz weights.

The network follows the authors' release (google-research/big_transfer): a
7x7/2 root convolution with explicit zero padding and a 3x3/2 max-pool, four
blocks of pre-activation bottleneck units (GN -> ReLU -> conv, the stride in
the 3x3 convolution, a projection shortcut in each block's first unit), block
strides 1, 2, 2, 2, then GN -> ReLU -> global average pool. Every convolution
standardizes its kernel per output channel; every GroupNorm has 32 groups.
The weights expect RGB in [-1, 1]. docs/bit.md explains the design, the
weights (online and offline) and the precision choices.

Precision: convolutions run in the global policy's compute dtype. Kernels are
float32 variables, standardized in float32 on every call and then cast (they
are small next to the activations); GroupNorm statistics are computed in
float32 from the reduced-precision activations, folded with gamma and beta
into one per-channel scale and shift, and applied in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import os
import re
import zipfile
from typing import Sequence
from urllib.parse import urlsplit

import numpy as np
import tensorflow as tf
import tf_keras as keras

from trainer.backbones import Backbone
from trainer.config import ModelConfig, UserError

WEIGHTS_URL = "https://storage.googleapis.com/bit_models/{name}.npz"
WEIGHTS_CACHE_SUBDIR = "models"  # in the Keras cache, beside Keras' own application weights
NPZ_PREFIX = "resnet/"  # every array of an official file is under it
# The pretrained classifier (1000 or 21843 classes): present in the files, dropped here.
HEAD_KEYS = ("resnet/head/conv2d/kernel", "resnet/head/conv2d/bias")
GROUPS = 32  # GroupNorm groups in every normalization of BiT
GROUP_NORM_EPSILON = 1e-5  # added to each group's variance
STANDARDIZATION_EPSILON = 1e-10  # added to each filter's variance; float32 only (0 in float16)
BLOCK_STRIDES = (1, 2, 2, 2)  # spatial stride of each block's first unit
ROOT_CHANNELS = 64  # root convolution channels at width factor 1
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # the first 8 bytes of every .h5 file


@dataclasses.dataclass(frozen=True)
class Architecture:
    units_per_block: tuple[int, ...]  # bottleneck units in each of the four blocks
    root_width: int  # channels of the root convolution: 64 x the width factor

    def name(self) -> str:
        """R{depth}x{width factor}, as the authors name their models (R50x1, R152x4)."""
        depth = 3 * sum(self.units_per_block) + 2
        factor = self.root_width / ROOT_CHANNELS
        return f"R{depth}x{factor:g}"


# --bit_variant's architecture part -> the network. Tests may add a tiny entry.
ARCHITECTURES: dict[str, Architecture] = {
    "r50x1": Architecture((3, 4, 6, 3), 64),
    "r50x3": Architecture((3, 4, 6, 3), 192),
    "r101x1": Architecture((3, 4, 23, 3), 64),
    "r101x3": Architecture((3, 4, 23, 3), 192),
    "r152x2": Architecture((3, 8, 36, 3), 128),
    "r152x4": Architecture((3, 8, 36, 3), 256),
}


def architecture(variant: str) -> Architecture:
    """The network of a --bit_variant name ("m-r50x1" -> R50x1)."""
    return ARCHITECTURES[variant.split("-", 1)[1]]


def official_url(variant: str) -> str:
    """The authors' .npz file of a --bit_variant: "m-r50x1" -> .../BiT-M-R50x1.npz."""
    dataset, arch = variant.split("-", 1)
    return WEIGHTS_URL.format(name=f"BiT-{dataset.upper()}-R{arch[1:]}")


class StandardizedConv2D(keras.layers.Layer):
    """A bias-free convolution of the weight-standardized kernel, with explicit zero padding.

    The kernel is a float32 variable (not auto-cast): it is standardized per
    output channel over (height, width, input channels) in float32, then cast
    to the compute dtype for the convolution.
    """

    def __init__(self, filters: int, kernel_size: int, strides: int = 1, padding: int = 0,
                 npz_name: str = "", **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding  # zeros added on each side, pixels
        self.npz_name = npz_name  # path of the kernel in an official file, without prefix

    def build(self, input_shape: tf.TensorShape) -> None:
        shape = (self.kernel_size, self.kernel_size, input_shape[-1], self.filters)
        # Standardization removes the kernel's scale, so any fan-in scaled init works.
        self.kernel = self.add_weight("kernel", shape=shape, initializer="he_normal",
                                      dtype="float32", autocast=False)
        super().build(input_shape)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        mean, variance = tf.nn.moments(self.kernel, axes=[0, 1, 2], keepdims=True)
        kernel = (self.kernel - mean) * tf.math.rsqrt(variance + STANDARDIZATION_EPSILON)
        if self.padding:
            # A separate pad, not conv2d's explicit padding: on CPUs the latter
            # misses oneDNN's bfloat16 kernels (a step measured 3.5 to 5x
            # slower than in float32).
            pad = self.padding
            inputs = tf.pad(inputs, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        return tf.nn.conv2d(inputs, tf.cast(kernel, self.compute_dtype), self.strides, "VALID")

    def npz_weights(self) -> dict[str, tf.Variable]:
        """This layer's variables by their path in an official .npz file."""
        return {f"{NPZ_PREFIX}{self.npz_name}/kernel": self.kernel}

    def get_config(self) -> dict:
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides, "padding": self.padding, "npz_name": self.npz_name}


class GroupNormReLU(keras.layers.Layer):
    """GroupNorm (32 groups, epsilon 1e-5) followed by ReLU, as every BiT normalization is.

    Statistics are computed in float32 whatever the compute dtype (bfloat16 and
    float16 lose too much summing thousands of values); gamma and beta are
    float32 variables folded with them into one scale and shift per sample and
    channel, applied to the activations in the compute dtype.
    """

    def __init__(self, npz_name: str = "", **kwargs):
        super().__init__(**kwargs)
        self.npz_name = npz_name  # path of gamma and beta in an official file, without prefix

    def build(self, input_shape: tf.TensorShape) -> None:
        channels = input_shape[-1]
        if channels % GROUPS:
            raise ValueError(f"GroupNorm needs channels divisible by {GROUPS}, got {channels}.")
        self.gamma = self.add_weight("gamma", shape=(channels,), initializer="ones",
                                     dtype="float32", autocast=False)
        self.beta = self.add_weight("beta", shape=(channels,), initializer="zeros",
                                    dtype="float32", autocast=False)
        super().build(input_shape)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        channels = inputs.shape[-1]
        batch, height, width = tf.unstack(tf.shape(inputs)[:3])
        grouped = tf.reshape(tf.cast(inputs, tf.float32),
                             [batch, height, width, GROUPS, channels // GROUPS])
        mean, variance = tf.nn.moments(grouped, axes=[1, 2, 4], keepdims=True)
        scale = tf.math.rsqrt(variance + GROUP_NORM_EPSILON) * tf.reshape(
            self.gamma, [GROUPS, channels // GROUPS])
        shift = tf.reshape(self.beta, [GROUPS, channels // GROUPS]) - mean * scale
        scale = tf.cast(tf.reshape(scale, [batch, 1, 1, channels]), inputs.dtype)
        shift = tf.cast(tf.reshape(shift, [batch, 1, 1, channels]), inputs.dtype)
        return tf.nn.relu(inputs * scale + shift)

    def npz_weights(self) -> dict[str, tf.Variable]:
        """This layer's variables by their path in an official .npz file."""
        return {f"{NPZ_PREFIX}{self.npz_name}/gamma": self.gamma,
                f"{NPZ_PREFIX}{self.npz_name}/beta": self.beta}

    def get_config(self) -> dict:
        return {**super().get_config(), "npz_name": self.npz_name}


def _conv(x: tf.Tensor, npz_name: str, filters: int, kernel_size: int, strides: int = 1,
          padding: int = 0) -> tf.Tensor:
    return StandardizedConv2D(filters, kernel_size, strides, padding, npz_name=npz_name,
                              name=npz_name.replace("/", "_"))(x)


def _group_norm_relu(x: tf.Tensor, npz_name: str) -> tf.Tensor:
    return GroupNormReLU(npz_name=npz_name, name=npz_name.replace("/", "_"))(x)


def _unit(x: tf.Tensor, name: str, bottleneck: int, strides: int, project: bool) -> tf.Tensor:
    """Pre-activation bottleneck: GN-ReLU, then 1x1, GN-ReLU, 3x3 (strided), GN-ReLU, 1x1, + shortcut."""
    preactivated = _group_norm_relu(x, f"{name}/a/group_norm")
    shortcut = x
    if project:
        shortcut = _conv(preactivated, f"{name}/a/proj/standardized_conv2d", 4 * bottleneck, 1,
                         strides)
    y = _conv(preactivated, f"{name}/a/standardized_conv2d", bottleneck, 1)
    y = _group_norm_relu(y, f"{name}/b/group_norm")
    y = _conv(y, f"{name}/b/standardized_conv2d", bottleneck, 3, strides, padding=1)
    y = _group_norm_relu(y, f"{name}/c/group_norm")
    y = _conv(y, f"{name}/c/standardized_conv2d", 4 * bottleneck, 1)
    return keras.layers.Add(name=f"{name.replace('/', '_')}_add")([y, shortcut])


def build_network(units_per_block: Sequence[int], root_width: int, image_size: int,
                  name: str = "backbone") -> keras.Model:
    """The BiT ResNet-v2 on [-1, 1] images -> [batch, 32 x root_width] float32 features.

    Args:
      units_per_block: bottleneck units in each of the four blocks (R50: 3, 4, 6, 3).
      root_width: channels of the root convolution, 64 x the width factor; a
        multiple of 32 (the GroupNorm groups).
      image_size: square input size, pixels.
      name: the model's name.

    Returns:
      An uncompiled model computing in the global precision policy, its
      features in float32.
    """
    inputs = keras.Input((image_size, image_size, 3))
    x = _conv(inputs, "root_block/standardized_conv2d", root_width, 7, strides=2, padding=3)
    x = keras.layers.ZeroPadding2D(1, name="root_block_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="root_block_pool")(x)
    for block, (units, strides) in enumerate(zip(units_per_block, BLOCK_STRIDES), start=1):
        bottleneck = root_width * 2 ** (block - 1)
        for unit in range(1, units + 1):
            x = _unit(x, f"block{block}/unit{unit:02d}", bottleneck,
                      strides if unit == 1 else 1, project=unit == 1)
    x = _group_norm_relu(x, "group_norm")
    # Averaged in float32: the features leave the backbone in float32.
    features = keras.layers.GlobalAveragePooling2D(dtype="float32", name="pool")(x)
    return keras.Model(inputs, features, name=name)


def npz_variables(network: keras.Model) -> dict[str, tf.Variable]:
    """Every variable of a `build_network` model by its path in an official .npz file."""
    variables = {}
    for layer in network.layers:
        if isinstance(layer, (StandardizedConv2D, GroupNormReLU)):
            variables.update(layer.npz_weights())
    return variables


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


def weights_path(config: ModelConfig) -> str:
    """The local .npz file of --bit_weights, downloaded once into the Keras cache
    ($KERAS_HOME or ~/.keras, under models/) if a URL.

    Raises:
      UserError: a local path is not a file, or the download failed (offline).
    """
    source = config.bit_weights or official_url(config.bit_variant)
    if "://" not in source:
        if not os.path.isfile(source):
            raise UserError(f"--bit_weights={source} is not a file; pass the path or URL of "
                            "a BiT .npz file, or none for random initialisation.")
        return source
    file_name = os.path.basename(urlsplit(source).path) or "bit_weights.npz"
    # $KERAS_HOME as Keras' own config uses it (the Kubernetes Jobs point it at
    # the data volume); tf_keras' get_file itself only knows ~/.keras.
    cache_dir = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        # get_file falls back to /tmp/.keras, which the OS empties, when the directory is missing.
        os.makedirs(cache_dir, exist_ok=True)
    except OSError:
        pass  # a read-only home: /tmp/.keras it is
    try:
        return keras.utils.get_file(file_name, origin=source, cache_subdir=WEIGHTS_CACHE_SUBDIR,
                                    cache_dir=cache_dir)
    except Exception as e:  # get_file raises plain Exception for every fetch failure
        raise UserError(
            f"--bit_weights: the BiT weights {source} could not be downloaded "
            f"({str(e).splitlines()[0][:200]}). Offline, download {file_name} on a connected "
            f"machine, copy it here and pass --bit_weights=/path/to/{file_name} (or "
            "--bit_weights=none for random initialisation).") from None


def checked_weights_path(config: ModelConfig) -> str:
    """The local .npz file of --bit_weights (downloaded once), checked against --bit_variant.

    Raises:
      UserError: naming --bit_weights; see `weights_path` and `check_npz`.
    """
    path = weights_path(config)
    check_npz(path, config.bit_weights or official_url(config.bit_variant), config.bit_variant)
    return path


def check_source(config: ModelConfig) -> None:
    """Fails fast, before any data is read, on --bit_weights that cannot be loaded.

    Raises:
      UserError: naming --bit_weights; see `checked_weights_path`.
    """
    if config.bit_weights != "none":
        checked_weights_path(config)


def load_weights(network: keras.Model, path: str) -> None:
    """Assigns every array of a checked .npz file (head aside) to its variable of `network`."""
    with np.load(path, allow_pickle=False) as arrays:
        for key, variable in npz_variables(network).items():
            variable.assign(arrays[key])


def build(config: ModelConfig, image_size: int) -> Backbone:
    """The BiT of --bit_variant with the weights of --bit_weights (checked before loading)."""
    arch = architecture(config.bit_variant)
    network = build_network(arch.units_per_block, arch.root_width, image_size)
    if config.bit_weights != "none":
        load_weights(network, checked_weights_path(config))
    preprocess = keras.layers.Rescaling(1 / 127.5, offset=-1.0, dtype="float32",
                                        name="preprocess")
    return Backbone(preprocess, network, has_batch_norm=False, mixed_precision=True)
