"""Few-shot training sets (--examples_per_class): K examples of each class, drawn by the seed.

BiT's protocol evaluates transfer with 1, 5 or 10 training examples per class
(and VTAB-1k with 1,000 in all). The draw is from the training split only,
after the train/validation split, so validation is the same whatever K is.
"""

from __future__ import annotations

import numpy as np

from trainer.config import UserError


def few_shot(labels: np.ndarray, examples_per_class: int | None, seed: int,
             class_names: tuple[str, ...] | list[str]) -> np.ndarray:
    """The training examples kept by --examples_per_class: K of each class, drawn by `seed`.

    Args:
      labels: the training split's labels, in its order.
      examples_per_class: K, or None for every example.
      seed: --seed.
      class_names: names of the labels, for the message.

    Returns:
      The kept examples' indices into `labels`, in the split's order.

    Raises:
      UserError: a class has fewer than K training examples; names --examples_per_class.
    """
    if examples_per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    kept = []
    for label, name in enumerate(class_names):
        candidates = np.flatnonzero(labels == label)
        if len(candidates) < examples_per_class:
            raise UserError(
                f"--examples_per_class={examples_per_class}: class {name} has only "
                f"{len(candidates)} training examples (after --val_fraction); lower "
                "--examples_per_class or add images.")
        kept.append(rng.choice(candidates, examples_per_class, replace=False))
    return np.sort(np.concatenate(kept))
