"""The backbone registry: what each backbone is (a `Spec`), found by its --backbone name.

Each module in MODULES declares `SPECS`, a tuple of `Spec`: whether the
backbone starts pretrained, whether it follows the precision policy, its
BatchNorm layers, variants, input range, how reports name its weights, its
checks, the inputs it needs (trainer/preflight.py), and `build`. Configuration
checks, the compute and XLA choices, the model, compare and the benchmark ask
the spec; none keeps a list of names.
Adding a backbone is its module plus one line in MODULES.

No TensorFlow here or in a backbone module at import time (`build` and the
source checks import it when called): `--print_config`, the configuration
checks and `--help` never touch devices.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    import tf_keras as keras

    from trainer.config import DataConfig, ModelConfig
    from trainer.preflight import Need

# The modules that declare backbones, each with SPECS; the order is --help's.
MODULES = (
    "trainer.backbones.resnet50",
    "trainer.backbones.hub",
    "trainer.backbones.bit",
    "trainer.backbones.wide_resnet",
)
RANDOM_WEIGHTS = "none (random)"  # how reports name a randomly initialised backbone's weights
KERAS_CACHE_SUBDIR = "models"  # where Keras keeps downloaded weights, in its cache directory
LAYER_NAME = "backbone"  # the name of the layer `build` returns (export and tests find it by it)
# What a network takes, made from uint8 RGB images by the model's preprocessing layer:
# "caffe": BGR minus the ImageNet channel means (0..255 scale), as Keras ResNet50's
# weights expect; "[0,1]": RGB / 255, what TF Hub image models take; "[-1,1]": RGB
# / 127.5 - 1.
INPUT_RANGES = ("caffe", "[0,1]", "[-1,1]")


def _no_check(*_: Any) -> None:
    """Nothing to check."""


def _no_needs(_: Any) -> list[Need]:
    """Needs no input beyond the flags."""
    return []


def _random_initialisation(_: Any) -> bool:
    return False


def _random_weights(_: Any) -> str:
    return RANDOM_WEIGHTS


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one --backbone value is: facts, checks and the network.

    Functions take the model section of the run's Config (`trainable`
    resolved where it matters); `weights` takes a run's flat config.json
    mapping, so compare can name the weights of old runs.
    """

    name: str  # the --backbone value
    description: str  # one line for --help and the docs
    # uint8 images, image_size -> the network layer named LAYER_NAME: images in
    # `input_range` -> float [batch, features]. Imports TensorFlow when called.
    build: Callable[[ModelConfig, int], keras.layers.Layer]
    input_range: str  # one of INPUT_RANGES
    # Whether it starts from trained weights; default: never (trained from scratch).
    pretrained: Callable[[ModelConfig], bool] = _random_initialisation
    # The starting weights in a report's words; default: RANDOM_WEIGHTS.
    weights: Callable[[Mapping[str, Any]], str] = _random_weights
    # A TF Hub SavedModel: keeps its saved float32 whatever the precision
    # policy, and XLA cannot compile its trainable gradient once.
    saved_model: bool = False
    batch_norm: bool = False  # has BatchNorm layers: a frozen run keeps their statistics
    # Its BatchNorm layers are built here: --batch_norm_momentum reaches them.
    native_batch_norm: bool = False
    # The ModelConfig fields only this backbone reads (a field whose default is
    # None may be set only for the backbones that read it).
    fields: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()  # the values of its variant field, if it has one
    # Raises UserError on a value of `fields` no run could use; called whatever
    # the backbone, so a wrong value fails at once.
    check_fields: Callable[[ModelConfig], None] = _no_check
    # (model, data): raises UserError on settings this backbone cannot run
    # with; no file is read.
    check: Callable[[ModelConfig, DataConfig], None] = _no_check
    # The local files its flags name that cannot be used, and what it would
    # download for lack of a local copy (trainer/preflight.py); fetches nothing.
    needs: Callable[[ModelConfig], list[Need]] = _no_needs
    # Raises UserError, before any data is read, on weights or a handle the
    # run could not load. Local files only, except remote .npz weights, which
    # are fetched into their cache (what `build` would fetch).
    check_source: Callable[[ModelConfig], None] = _no_check
    # The benchmark's target for trainer / reference training images/s on a
    # CPU with bfloat16 units; None: no target.
    throughput_target: float | None = None

    def __post_init__(self) -> None:
        if self.input_range not in INPUT_RANGES:
            raise ValueError(f"Backbone {self.name}: input_range {self.input_range!r} is not "
                             f"one of {', '.join(INPUT_RANGES)}.")
        if self.saved_model and self.throughput_target is not None:
            raise ValueError(f"Backbone {self.name}: a SavedModel computes in float32 "
                             "whatever the policy; a throughput target cannot apply.")


def keras_cached_file(file_name: str, cache_dir: str | None = None) -> str | None:
    """The file of that name in Keras' download cache (`models/` under `cache_dir`, by
    default ~/.keras, or under /tmp/.keras, where Keras falls back when that is not
    writable), or None: what keras.utils.get_file would not download again."""
    default = os.path.join(os.path.expanduser("~"), ".keras")
    for directory in (cache_dir or default, os.path.join("/tmp", ".keras")):
        path = os.path.join(directory, KERAS_CACHE_SUBDIR, file_name)
        if os.path.isfile(path):
            return path
    return None


def specs() -> tuple[Spec, ...]:
    """Every registered backbone, in MODULES order.

    Raises:
      ValueError: two specs share a name.
    """
    found: dict[str, Spec] = {}
    for module in MODULES:
        for spec in importlib.import_module(module).SPECS:
            if spec.name in found:
                raise ValueError(f"Backbone {spec.name} is declared twice (in {module}).")
            found[spec.name] = spec
    return tuple(found.values())


def names() -> tuple[str, ...]:
    """The --backbone values, in MODULES order."""
    return tuple(spec.name for spec in specs())


def weights_of(config: Mapping[str, Any]) -> str | None:
    """Where a run's backbone started from, in its spec's words, from the run's flat config
    (config.json's sections merged); None for a backbone no longer registered."""
    if config.get("backbone") not in names():
        return None
    return spec(config["backbone"]).weights(config)


def spec(name: str) -> Spec:
    """The backbone called `name`.

    Raises:
      KeyError: no registered backbone has that name (config.check names the flag).
    """
    for candidate in specs():
        if candidate.name == name:
            return candidate
    raise KeyError(name)
