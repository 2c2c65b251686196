"""Native BiT (Big Transfer): its variants, their architectures, and how a run builds one.

BiT is a ResNet-v2 with GroupNorm and Weight Standardization (the network:
bit_network.py), started from the authors' official .npz weights (the files:
bit_weights.py), which expect RGB in [-1, 1]. A variant names the dataset its
weights were trained on (BiT-S: ImageNet-1k, BiT-M: ImageNet-21k) and the
architecture (R50x1: ResNet-50, width factor 1). docs/bit.md explains the
design, the weights (online and offline) and the precision choices.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping

from trainer.backbones import RANDOM_WEIGHTS, Spec
from trainer.config import ModelConfig, UserError

if TYPE_CHECKING:
    import tf_keras as keras

    from trainer.preflight import Need

# BiT-S (ImageNet-1k) and BiT-M (ImageNet-21k) as published; R152x2 only as BiT-M.
VARIANTS = (
    "s-r50x1", "s-r50x3", "s-r101x1", "s-r101x3", "s-r152x4",
    "m-r50x1", "m-r50x3", "m-r101x1", "m-r101x3", "m-r152x2", "m-r152x4",
)
ROOT_CHANNELS = 64  # root convolution channels at width factor 1


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


def pretrained(config: ModelConfig) -> bool:
    """Whether the run loads weights (--bit_weights is not none)."""
    return config.bit_weights != "none"


def weights(config: Mapping[str, Any]) -> str:
    """The official file's name and where it came from (its URL or the .npz path), or none (random)."""
    from trainer.backbones import bit_weights  # it imports this module

    if config.get("bit_weights") == "none":
        return RANDOM_WEIGHTS
    variant = config.get("bit_variant")
    return (f"{bit_weights.official_name(variant)}: "
            f"{config.get('bit_weights') or bit_weights.official_url(variant)}")


def check_fields(config: ModelConfig) -> None:
    """Raises UserError naming --bit_variant when it is not a published variant, or
    --bit_weights when empty."""
    if config.bit_variant not in VARIANTS:
        raise UserError(f"--bit_variant={config.bit_variant} is not valid; choose one of "
                        f"{', '.join(VARIANTS)}.")
    if config.bit_weights == "":
        raise UserError("--bit_weights must be an .npz path or URL, or none.")


def needs(config: ModelConfig) -> list[Need]:
    """The .npz file of --bit_weights, or its download (see bit_weights.needs)."""
    from trainer.backbones import bit_weights  # it imports this module

    return bit_weights.needs(config)


def check_source(config: ModelConfig) -> None:
    """Raises UserError naming --bit_weights when the .npz file (fetched into the Keras cache
    if a URL) does not fit the network of --bit_variant; see bit_weights.check_source."""
    from trainer.backbones import bit_weights  # it imports this module

    bit_weights.check_source(config)


def build(config: ModelConfig, image_size: int) -> keras.Model:
    """The BiT of --bit_variant with the weights of --bit_weights (checked before loading)."""
    from trainer.backbones import bit_network, bit_weights

    arch = architecture(config.bit_variant)
    network = bit_network.build_network(arch.units_per_block, arch.root_width, image_size)
    if config.bit_weights != "none":
        bit_weights.load_weights(bit_network.npz_variables(network),
                                 bit_weights.checked_weights_path(config))
    return network


SPECS = (Spec(
    name="bit",
    description="native BiT (ResNet-v2, GroupNorm, Weight Standardization) on the official "
                ".npz weights (--bit_variant, --bit_weights)",
    build=build, input_range="[-1,1]", pretrained=pretrained, weights=weights,
    fields=("bit_variant", "bit_weights"), variants=VARIANTS,
    check_fields=check_fields, needs=needs, check_source=check_source,
    throughput_target=1.25,  # against the same network in float32 (trainer.bench)
),)
