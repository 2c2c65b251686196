"""The native BiT network: ResNet-v2 with GroupNorm and Weight Standardization, as tf_keras layers.

The network follows the authors' release (google-research/big_transfer): a
7x7/2 root convolution with explicit zero padding and a 3x3/2 max-pool, four
blocks of pre-activation bottleneck units (GN -> ReLU -> conv, the stride in
the 3x3 convolution, a projection shortcut in each block's first unit), block
strides 1, 2, 2, 2, then GN -> ReLU -> global average pool. Every convolution
standardizes its kernel per output channel; every GroupNorm has 32 groups.
Each layer knows the path of its variables in the official .npz files
(`npz_variables`). docs/bit.md explains the design and the precision choices.

Precision: convolutions run in the global policy's compute dtype. Kernels are
float32 variables, standardized in float32 on every call and then cast (they
are small next to the activations); GroupNorm statistics are computed in
float32 from the reduced-precision activations, folded with gamma and beta
into one per-channel scale and shift, and applied in the compute dtype.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf
import tf_keras as keras

from trainer.backbones import LAYER_NAME
from trainer.backbones.bit_weights import NPZ_PREFIX

GROUPS = 32  # GroupNorm groups in every normalization of BiT
GROUP_NORM_EPSILON = 1e-5  # added to each group's variance
STANDARDIZATION_EPSILON = 1e-10  # added to each filter's variance; float32 only (0 in float16)
BLOCK_STRIDES = (1, 2, 2, 2)  # spatial stride of each block's first unit


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
                  name: str = LAYER_NAME) -> keras.Model:
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

