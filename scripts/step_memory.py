#!/usr/bin/env python3
"""Measures the memory one training step of a backbone needs per image, to choose a micro-batch.

  python scripts/step_memory.py --backbone=bit --bit_variant=m-r50x1 --image_size=480

Runs a few training steps (the trainer's own model, loss and training step, SGD,
random weights) at two micro-batch sizes, each in a fresh process, and reports
the peak resident memory of each and the difference per image: the activations
the backward pass keeps, plus the step's temporaries. Measured on the CPU in
float32; on a GPU under mixed_float16 the convolutions' activations take about
half (docs/recipes.md says how the bit_hyperrule preset's micro-batch follows).
"""

import os
import resource
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

STEPS = 2  # training steps per measurement (the first one traces)


def measure(flags: list[str], batch: int) -> float:
    """Peak resident memory (MB) of a process that trains STEPS steps at `batch`."""
    import numpy as np

    import trainer  # noqa: F401  the Keras 2 API before TensorFlow loads
    from trainer import checks, experiments, train
    from trainer.config import override

    values = dict(flag.lstrip("-").split("=", 1) for flag in flags)
    config = checks.resolve(override(experiments.configure(None, {}), {
        "backbone": values.pop("backbone", "bit"), "bit_weights": "none", "trainable": True,
        "optimizer": "sgd", "precision": "float32", "jit_compile": "false",
        "image_size": int(values.pop("image_size", 480)), "global_batch_size": batch,
        **values}))
    compute = train.Compute("float32", "measured", True, False, "measured", 1, "measured")
    import tensorflow as tf

    model = train.create_compiled_model(config, tf.distribute.get_strategy(), 10, compute)
    size = config.data.image_size
    images = np.random.default_rng(0).integers(0, 256, (batch * STEPS, size, size, 3), np.uint8)
    labels = np.arange(batch * STEPS) % 10
    model.fit(images, labels, batch_size=batch, epochs=1, verbose=0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(flags: list[str]) -> None:
    batches = (1, 3)
    peaks = {}
    for batch in batches:
        out = subprocess.run([sys.executable, __file__, "--measure", str(batch), *flags],
                             capture_output=True, text=True, check=True).stdout
        peaks[batch] = float(out.split()[-1])
        print(f"micro-batch {batch}: peak resident memory {peaks[batch]:.0f} MB", flush=True)
    per_image = (peaks[batches[1]] - peaks[batches[0]]) / (batches[1] - batches[0])
    print(f"per image: {per_image:.0f} MB (float32, CPU); fixed: "
          f"{peaks[batches[0]] - per_image:.0f} MB")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        print(measure(sys.argv[3:], int(sys.argv[2])))
    else:
        main(sys.argv[1:])
