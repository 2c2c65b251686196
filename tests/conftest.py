"""Shared fixtures: two logical CPUs, a small image folder, a tiny TF Hub SavedModel."""

import os

import trainer  # noqa: F401  picks the Keras 2 API before TensorFlow loads

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

# Two logical CPU devices for MirroredStrategy tests; must precede any TF op.
_CPUS = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _CPUS[0], [tf.config.LogicalDeviceConfiguration()] * 2)

CLASSES = ("cats", "dogs", "owls")


def require_tool(available, why_missing):
    """Skips a test whose outside tool is missing, saying what to install; fails instead in
    CI (CI=true), where .ci/run provides every tool and a skip would hide a broken check."""
    if available:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(why_missing)
    pytest.skip(why_missing)


def write_image_folder(root, per_class=6, size=(40, 30), seed=0):
    """One sub-folder per class with JPEG and PNG files; each class has its own colour."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            pixels = np.full((size[1], size[0], 3), 40 + 90 * label, np.uint8)
            pixels = np.clip(pixels + rng.integers(0, 30, pixels.shape), 0, 255).astype(np.uint8)
            ext = "jpg" if i % 2 else "png"
            Image.fromarray(pixels).save(os.path.join(root, name, f"{name} {i}.{ext}"))
    return str(root)


@pytest.fixture
def image_dir(tmp_path):
    return write_image_folder(tmp_path / "images")


def save_tiny_hub_model(path):
    """A TF2 SavedModel usable by hub.KerasLayer: float32 [b, h, w, 3] -> [b, 4], with BN."""
    import tf_keras as keras

    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, strides=2)(inputs)
    x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    tf.saved_model.save(keras.Model(inputs, outputs), str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_hub_model(tmp_path_factory):
    return save_tiny_hub_model(tmp_path_factory.mktemp("hub") / "tiny_feature_vector")


def run_main(argv, capsys):
    """Runs the command line in-process on argv; returns (exit code, stdout, stderr)."""
    from trainer import main

    main.FLAGS.unparse_flags()
    code = 0
    try:
        main.main(main.parse_flags(["trainer"] + argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def float32_policy():
    """Tests that set a mixed-precision policy must not leak it to the next test."""
    import tf_keras as keras

    yield
    keras.mixed_precision.set_global_policy("float32")


def poison_the_loss(monkeypatch, factor, from_step):
    """Fault injection: the trainer's compiled loss is multiplied by `factor` from optimizer
    step `from_step` on, whatever the kernels compute (a blown-up learning rate may or may
    not overflow, depending on the kernel library)."""
    import tf_keras as keras

    from trainer import train

    create = train.create_compiled_model

    def create_poisoned(config, strategy, num_classes, compute, *schedule):
        model = create(config, strategy, num_classes, compute, *schedule)
        iterations = model.optimizer.iterations

        def poisoned_loss(labels, probabilities):
            loss = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
            return loss * tf.where(iterations >= from_step, factor, 1.0)

        with strategy.scope():
            model.compile(optimizer=model.optimizer, loss=poisoned_loss, metrics=["accuracy"],
                          jit_compile=compute.jit_compile)
        return model

    monkeypatch.setattr(train, "create_compiled_model", create_poisoned)
