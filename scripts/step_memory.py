#!/usr/bin/env python3
"""Measures the memory one training step of a backbone needs per image, to choose a micro-batch.

  python scripts/step_memory.py --backbone=bit --bit_variant=m-r50x1 --image_size=480
  python scripts/step_memory.py --bit_variant=m-r50x1 --image_size=480 --precision=mixed_float16

Runs two training steps (the trainer's own model, loss and training step, SGD,
random weights; float32 unless --precision says otherwise) at micro-batches of
1, 2 and 4 images, each in a fresh process on the CPU with TensorFlow's BFC
allocator (the one GPUs use), and reports the allocator's peak for each and
the growth per image: the activations the backward pass keeps and the step's
temporaries (docs/recipes.md says how the bit_hyperrule preset's micro-batch
follows). Float16 runs slowly on most CPUs; its memory is what a GPU's would be.
"""

import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

BATCHES = (1, 2, 4)  # images per micro-batch, one process each
STEPS = 2  # training steps per measurement (the first one traces)


def measure(flags: list[str], batch: int) -> float:
    """The allocator's peak (MB) in a process that trains STEPS steps at `batch`."""
    import numpy as np

    import trainer  # noqa: F401  the Keras 2 API before TensorFlow loads
    import tensorflow as tf
    from trainer import checks, compute as compute_lib, experiments, train
    from trainer.config import override

    values = dict(flag.lstrip("-").split("=", 1) for flag in flags)
    backbone = values.pop("backbone", "bit")
    random_weights = {"bit": {"bit_weights": "none"}, "resnet50": {"weights": "none"}}
    config = checks.resolve(override(experiments.configure(None, {}), {
        "backbone": backbone, **random_weights.get(backbone, {}), "trainable": True,
        "optimizer": "sgd", "precision": values.pop("precision", "float32"), "jit_compile": "false",
        "image_size": int(values.pop("image_size", 480)), "global_batch_size": batch,
        **values}))
    compute = compute_lib.Compute(config.train.precision, "measured", True, False, "measured", 1,
                                  "measured")
    model = train.create_compiled_model(config, tf.distribute.get_strategy(), 10, compute)
    size = config.data.image_size
    images = np.random.default_rng(0).integers(0, 256, (batch * STEPS, size, size, 3), np.uint8)
    model.fit(images, np.arange(batch * STEPS) % 10, batch_size=batch, epochs=1, verbose=0)
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20


def main(flags: list[str]) -> None:
    env = {**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true"}  # counts its peak, as on GPUs
    peaks = {}
    for batch in BATCHES:
        out = subprocess.run([sys.executable, __file__, "--measure", str(batch), *flags],
                             capture_output=True, text=True, check=True, env=env).stdout
        peaks[batch] = float(out.split()[-1])
        print(f"micro-batch {batch}: peak {peaks[batch]:.0f} MB", flush=True)
    first, last = BATCHES[0], BATCHES[-1]
    per_image = (peaks[last] - peaks[first]) / (last - first)
    print(f"per image: {per_image:.0f} MB; fixed: {peaks[first] - per_image:.0f} MB")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        print(measure(sys.argv[3:], int(sys.argv[2])))
    else:
        main(sys.argv[1:])
