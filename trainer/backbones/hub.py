"""TF Hub image feature vectors as hub.KerasLayer: resnet50_hub, and any TF2 SavedModel (--backbone=hub).

A SavedModel keeps the dtypes it was saved with: no precision policy reaches
inside it, and XLA cannot compile its trainable gradient once (see
`distribute.choose_jit_compile`).
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Any, Mapping

from trainer.backbones import LAYER_NAME, Spec
from trainer.config import DataConfig, ModelConfig, UserError
from trainer.preflight import LocalProblem, Need, Remote

if TYPE_CHECKING:
    import tf_keras as keras

HUB_RESNET50_HANDLE = "https://tfhub.dev/google/imagenet/resnet_v1_50/feature_vector/5"


def handle(config: ModelConfig) -> str:
    """The TF Hub handle of a hub backbone: --hub_handle, or the default for it."""
    if config.hub_handle:
        return config.hub_handle
    return HUB_RESNET50_HANDLE


def weights(config: Mapping[str, Any]) -> str:
    """hub: the handle (URL or directory) the run loaded."""
    return f"hub: {config.get('hub_handle') or HUB_RESNET50_HANDLE}"


def needs_handle(config: ModelConfig, data: DataConfig) -> None:
    """--backbone=hub has no default model: raises UserError naming --hub_handle."""
    if not config.hub_handle:
        raise UserError("--backbone=hub needs --hub_handle (a TF2 SavedModel image feature "
                        "vector: URL or directory).")


def _local_handle_problem(config: ModelConfig) -> str | None:
    """Why a local --hub_handle is not a usable SavedModel, or None (URLs: None)."""
    path = handle(config)
    if "://" in path:
        return None
    if not os.path.isdir(path):
        return f"--hub_handle={path} is neither a URL nor a directory."
    if os.path.exists(os.path.join(path, "tfhub_module.pb")):
        if config.trainable:
            return (f"--hub_handle={path} is a TF1 Hub module, which cannot be fine-tuned; "
                    "use a TF2 SavedModel or --notrainable.")
    elif not os.path.exists(os.path.join(path, "saved_model.pb")):
        return f"--hub_handle={path} is not a SavedModel directory (no saved_model.pb)."
    return None


def _cached(url: str) -> bool:
    """Whether tensorflow_hub's download cache holds the model of `url` (TFHUB_CACHE_DIR,
    --tfhub_cache_dir or the temp directory; one directory per SHA-1 of the handle)."""
    from tensorflow_hub import resolver  # imports TensorFlow

    cache_dir = resolver.tfhub_cache_dir(use_temp=True)
    return os.path.isdir(os.path.join(cache_dir, hashlib.sha1(url.encode("utf8")).hexdigest()))


def needs(config: ModelConfig) -> list[Need]:
    """A local --hub_handle that is a usable SavedModel, or the download of a URL the TF
    Hub cache does not hold."""
    problem = _local_handle_problem(config)
    if problem:
        return [LocalProblem("--hub_handle", problem)]
    path = handle(config)
    if "://" not in path or _cached(path):
        return []
    return [Remote("--hub_handle", "the TF Hub model", path,
                   "Offline, download the model on a connected machine, extract it and pass "
                   "its directory with --hub_handle (or point TFHUB_CACHE_DIR at a cache that "
                   "holds it).")]


def check_source(config: ModelConfig) -> None:
    """Raises UserError naming --hub_handle when a local handle is not a usable SavedModel."""
    problem = _local_handle_problem(config)
    if problem:
        raise UserError(problem)


def build(config: ModelConfig, image_size: int) -> keras.layers.Layer:
    """hub.KerasLayer of the handle, float32, trainable as --trainable says."""
    import tensorflow_hub as hub

    path = handle(config)
    try:
        # Mixed precision does not reach inside a SavedModel: it keeps its dtypes.
        return hub.KerasLayer(path, trainable=config.trainable, dtype="float32",
                              name=LAYER_NAME)
    except Exception as e:
        raise UserError(
            f"--hub_handle={path}: the TF Hub model could not be loaded "
            f"({str(e).splitlines()[0][:200]}). Offline, download the model, extract it and "
            "pass its directory with --hub_handle (set TFHUB_CACHE_DIR to keep downloads)."
        ) from None


def _spec(name: str, description: str, **values: Any) -> Spec:
    # Hub image models take RGB in [0, 1]. Any of them may hold BatchNorm
    # layers (GroupNorm ones ignore `training`), none built here.
    return Spec(name=name, description=description, build=build, input_range="[0,1]",
                pretrained=lambda config: True, weights=weights, saved_model=True,
                batch_norm=True, fields=("hub_handle",), needs=needs, check_source=check_source,
                **values)


SPECS = (
    _spec("resnet50_hub", "TF Hub ResNet v1 50 ImageNet feature vector (--hub_handle: "
          "another copy of it)"),
    _spec("hub", "any TF2 SavedModel image feature vector (needs --hub_handle)",
          check=needs_handle),
)
