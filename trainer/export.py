"""What a finished run leaves for reuse: the serving SavedModel and the backbone in TF Hub format."""

from __future__ import annotations

import os
import shutil
import tempfile

import tf_keras as keras

from trainer.callbacks import write_atomically

EXPORT_DIR = "export"
BACKBONE_EXPORT_DIR = "export_backbone"
LABELS_FILE = "labels.txt"


def _publish(staging: str, target: str) -> None:
    """Replaces `target` by `staging` with renames: a reader never sees a half-written export."""
    old = f"{target}.old-{os.getpid()}"
    if os.path.exists(target):
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def export_model(model: keras.Model, class_names: tuple[str, ...], workdir: str,
                 chief: bool) -> None:
    """Writes workdir/export: a SavedModel (uint8 images -> probabilities) and labels.txt.

    Every worker saves (the save may run collectives); only the chief's copy is
    kept. The new export replaces the old one by rename, never half-written.
    """
    target = os.path.join(workdir, EXPORT_DIR)
    staging = f"{target}.tmp-{os.getpid()}" if chief else tempfile.mkdtemp()
    model.save(staging, save_format="tf", include_optimizer=False)
    if not chief:
        shutil.rmtree(staging, ignore_errors=True)
        return
    write_atomically(os.path.join(staging, LABELS_FILE), "\n".join(class_names) + "\n")
    _publish(staging, target)


def export_backbone(model: keras.Model, image_size: int, workdir: str, chief: bool) -> None:
    """Writes workdir/export_backbone: the trained backbone as a TF2 SavedModel in TF Hub
    feature-vector format (float32 [0, 1] images -> [batch, features])."""
    raise NotImplementedError("--export_backbone is not built yet (issue 3).")
