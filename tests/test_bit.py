"""Native BiT: the official .npz layout and its errors, the forward pass against plain tf.nn ops,
precision, freezing, XLA, and the backbone export round trip."""

import functools
import http.server
import re
import threading

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from conftest import run_main
from trainer import checks
from trainer import config as config_lib
from trainer import experiments
from trainer import backbones, export, models, train
from trainer.backbones import bit, bit_network, bit_weights
from trainer.config import ModelConfig, UserError
from trainer.data import sources

SIZE = 32  # pixels
# Two units in block 2, so an identity shortcut is exercised as well as projections.
TINY = bit.Architecture((1, 2, 1, 1), root_width=32)
# One unit in one block: the smallest BiT, for the tests that train it.
ONE_UNIT = bit.Architecture((1,), root_width=32)


def official_arrays(units_per_block, width, classes=7, kernel_scale=1.0, seed=0):
    """Random float32 arrays under the keys of the authors' .npz files, head included.

    Written from the published layout (not from trainer code): root kernel; per unit
    a/b/c group_norm gamma and beta and standardized_conv2d kernels, a projection
    in each block's unit01; the final group_norm; the head conv2d kernel and bias.
    """
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0, offset=0.0):
        return (offset + scale * rng.standard_normal(shape)).astype(np.float32)

    arrays = {"resnet/root_block/standardized_conv2d/kernel": normal(7, 7, 3, width, scale=kernel_scale)}
    channels = width
    for block, units in enumerate(units_per_block, start=1):
        middle = width * 2 ** (block - 1)
        for unit in range(1, units + 1):
            prefix = f"resnet/block{block}/unit{unit:02d}/"
            if unit == 1:
                arrays[prefix + "a/proj/standardized_conv2d/kernel"] = normal(
                    1, 1, channels, 4 * middle, scale=kernel_scale)
            shapes = {"a": (channels, (1, 1, channels, middle)),
                      "b": (middle, (3, 3, middle, middle)),
                      "c": (middle, (1, 1, middle, 4 * middle))}
            for part, (gn_channels, kernel) in shapes.items():
                arrays[prefix + f"{part}/group_norm/gamma"] = normal(gn_channels, scale=0.2, offset=1.0)
                arrays[prefix + f"{part}/group_norm/beta"] = normal(gn_channels, scale=0.2)
                arrays[prefix + f"{part}/standardized_conv2d/kernel"] = normal(*kernel, scale=kernel_scale)
            channels = 4 * middle
    arrays["resnet/group_norm/gamma"] = normal(channels, scale=0.2, offset=1.0)
    arrays["resnet/group_norm/beta"] = normal(channels, scale=0.2)
    arrays["resnet/head/conv2d/kernel"] = normal(1, 1, channels, classes)
    arrays["resnet/head/conv2d/bias"] = normal(classes)
    return arrays


def write_npz(path, arrays):
    np.savez(path, **arrays)
    return str(path)


def reference_features(arrays, units_per_block, images):
    """The BiT forward pass in float64 with plain tf.nn ops, unit by unit, from the file's arrays."""

    def conv(x, key, strides=1, pad=0):
        kernel = tf.constant(arrays[f"resnet/{key}/standardized_conv2d/kernel"], tf.float64)
        mean, variance = tf.nn.moments(kernel, axes=[0, 1, 2], keepdims=True)
        kernel = (kernel - mean) / tf.sqrt(variance + 1e-10)
        x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        return tf.nn.conv2d(x, kernel, strides, "VALID")

    def group_norm_relu(x, key):
        n, h, w, c = x.shape
        grouped = tf.reshape(x, [n, h, w, 32, c // 32])
        mean, variance = tf.nn.moments(grouped, axes=[1, 2, 4], keepdims=True)
        x = tf.reshape((grouped - mean) / tf.sqrt(variance + 1e-5), [n, h, w, c])
        gamma, beta = (tf.constant(arrays[f"{key}/{name}"], tf.float64)
                       for name in ("gamma", "beta"))
        return tf.nn.relu(x * gamma + beta)

    x = tf.constant(images, tf.float64) / 127.5 - 1.0
    x = conv(x, "root_block", strides=2, pad=3)
    x = tf.nn.max_pool2d(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), 3, 2, "VALID")
    for block, units in enumerate(units_per_block, start=1):
        for unit in range(1, units + 1):
            name = f"block{block}/unit{unit:02d}"
            strides = 2 if block > 1 and unit == 1 else 1
            preactivated = group_norm_relu(x, f"resnet/{name}/a/group_norm")
            shortcut = conv(preactivated, f"{name}/a/proj", strides) if unit == 1 else x
            y = conv(preactivated, f"{name}/a")
            y = conv(group_norm_relu(y, f"resnet/{name}/b/group_norm"), f"{name}/b", strides, pad=1)
            y = conv(group_norm_relu(y, f"resnet/{name}/c/group_norm"), f"{name}/c")
            x = y + shortcut
    return tf.reduce_mean(group_norm_relu(x, "resnet/group_norm"), axis=[1, 2]).numpy()


def tiny_config(weights="none", **values):
    return ModelConfig(backbone="bit", bit_variant="s-r50x1", bit_weights=weights, **values)


@pytest.fixture
def tiny_bit(monkeypatch):
    """--bit_variant=s-r50x1 builds the tiny network in this test (the variant table is public)."""
    monkeypatch.setitem(bit.ARCHITECTURES, "r50x1", TINY)


@pytest.fixture
def one_unit_bit(monkeypatch):
    monkeypatch.setitem(bit.ARCHITECTURES, "r50x1", ONE_UNIT)


@pytest.fixture
def tiny_npz(tmp_path):
    return write_npz(tmp_path / "BiT-S-R50x1.npz", official_arrays(TINY.units_per_block, TINY.root_width))


@pytest.fixture
def images():
    return np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)


def backbone_features(model, images):
    return keras.Model(model.input, model.get_layer("classifier").input)(images).numpy()


@pytest.mark.slow
def test_an_official_r50x1_file_loads_every_array_into_its_variable(tmp_path, images):
    arrays = official_arrays((3, 4, 6, 3), 64, classes=21843)
    path = write_npz(tmp_path / "BiT-M-R50x1.npz", arrays)
    model = models.create_model(ModelConfig(backbone="bit", bit_variant="m-r50x1", bit_weights=path),
                                num_classes=3, image_size=SIZE)
    variables = bit_network.npz_variables(model.get_layer("backbone"))
    # Every array but the pretrained head has exactly one variable, holding it.
    assert set(variables) == set(arrays) - {"resnet/head/conv2d/kernel", "resnet/head/conv2d/bias"}
    assert len({id(v) for v in variables.values()}) == len(model.get_layer("backbone").weights)
    for key, variable in variables.items():
        np.testing.assert_array_equal(variable.numpy(), arrays[key], err_msg=key)
    assert not np.any(model.get_layer("classifier").kernel.numpy())  # a fresh zero head
    assert model.get_layer("backbone").count_params() == 23_500_352  # BiT R50x1


def test_forward_pass_matches_plain_tf_nn_ops_in_float32(tiny_bit, tiny_npz, images):
    model = models.create_model(tiny_config(tiny_npz), 3, SIZE)
    expected = reference_features(dict(np.load(tiny_npz)), TINY.units_per_block, images)
    np.testing.assert_allclose(backbone_features(model, images), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("policy, tolerance", [("mixed_bfloat16", 0.1), ("mixed_float16", 0.02)])
def test_forward_pass_under_mixed_precision_with_tiny_kernels(tiny_bit, tmp_path, images, policy,
                                                              tolerance):
    # Kernels of scale 1e-4 have variances near 1e-8: standardized in float16
    # they would underflow (and 1e-10 is 0 there); in float32 they do not.
    arrays = official_arrays(TINY.units_per_block, TINY.root_width, kernel_scale=1e-4)
    path = write_npz(tmp_path / "BiT-S-R50x1.npz", arrays)
    keras.mixed_precision.set_global_policy(policy)  # conftest restores float32
    model = models.create_model(tiny_config(path), 3, SIZE)
    conv = model.get_layer("backbone").get_layer("block1_unit01_b_standardized_conv2d")
    assert conv.output.dtype == keras.mixed_precision.global_policy().compute_dtype
    features = backbone_features(model, images)
    expected = reference_features(arrays, TINY.units_per_block, images)
    assert features.dtype == np.float32 and np.all(np.isfinite(features))
    error = np.linalg.norm(features - expected) / np.linalg.norm(expected)
    assert error < tolerance


def test_group_norm_statistics_are_float32_under_float16():
    # Squares of activations this large overflow float16 (max 65504); float32
    # statistics keep them, and the normalized output fits float16 again.
    x = (100 + 300 * np.random.default_rng(0).standard_normal((2, 16, 16, 64))).astype(np.float32)
    x_fp16 = tf.cast(tf.constant(x), tf.float16)
    out = bit_network.GroupNormReLU(dtype="mixed_float16")(x_fp16)
    assert out.dtype == tf.float16
    grouped = tf.cast(x_fp16, tf.float64).numpy().reshape(2, 16, 16, 32, 2)
    mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
    variance = grouped.var(axis=(1, 2, 4), keepdims=True)
    expected = np.maximum((grouped - mean) / np.sqrt(variance + 1e-5), 0).reshape(x.shape)
    np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), expected, atol=0.01)


def test_bad_weights_files_name_the_flag_and_the_first_offending_key(tiny_bit, tmp_path):
    good = official_arrays(TINY.units_per_block, TINY.root_width)
    cases = []
    truncated = dict(good)
    del truncated["resnet/block3/unit01/b/group_norm/beta"]
    cases.append((truncated, "has no array resnet/block3/unit01/b/group_norm/beta"))
    renamed = dict(good)
    renamed["resnet/block4/unit01/c/conv/kernel"] = renamed.pop(
        "resnet/block4/unit01/c/standardized_conv2d/kernel")
    cases.append((renamed, "has no array resnet/block4/unit01/c/standardized_conv2d/kernel"))
    deeper = official_arrays((1, 3, 1, 1), TINY.root_width)
    cases.append((deeper, r"no layer of BiT R17x0.5 uses the array resnet/block2/unit03/a/group_norm/gamma "
                          r"\(the file looks like R20x0.5\)"))
    wider = official_arrays(TINY.units_per_block, 64)
    cases.append((wider, r"resnet/root_block/standardized_conv2d/kernel has shape \(7, 7, 3, 64\)"))
    for i, (arrays, message) in enumerate(cases):
        path = write_npz(tmp_path / f"case{i}.npz", arrays)
        with pytest.raises(UserError, match=f"--bit_weights={path}: .*{message}"):
            backbones.spec("bit").check_source(tiny_config(path))

    not_npz = tmp_path / "weights.npz"
    not_npz.write_text("not an archive")
    with pytest.raises(UserError, match="not an .npz file"):
        backbones.spec("bit").check_source(tiny_config(str(not_npz)))
    h5 = tmp_path / "BiT-S-R50x1.h5"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save_weights(str(h5))
    with pytest.raises(UserError, match=r"--bit_weights=.*HDF5 \(.h5\) file"):
        backbones.spec("bit").check_source(tiny_config(str(h5)))
    with pytest.raises(UserError, match="--bit_weights=.*is not a file"):
        backbones.spec("bit").check_source(tiny_config(str(tmp_path / "missing.npz")))


@pytest.mark.parametrize("weights, message", [
    ("missing.npz", "is not a file"),
    ("bad.npz", "not an .npz file"),
    ("http://127.0.0.1:9/BiT-S-R50x1.npz", "could not be downloaded.*--bit_weights=/path/to/BiT-S-R50x1.npz"),
], ids=["missing", "not-npz", "offline-url"])
def test_command_line_exits_2_before_reading_data(tiny_bit, tmp_path, capsys, monkeypatch,
                                                  image_dir, weights, message):
    (tmp_path / "bad.npz").write_text("nope")
    if "://" not in weights:
        weights = str(tmp_path / weights)

    def read_data(*_):
        raise AssertionError("the data was read before the weights were checked")

    monkeypatch.setattr(sources, "create_data_source", read_data)
    code, _, err = run_main(["--backbone=bit", "--bit_variant=s-r50x1", f"--bit_weights={weights}",
                             f"--image_dir={image_dir}", f"--workdir={tmp_path / 'run'}"], capsys)
    assert code == 2, err
    assert "--bit_weights" in err and "Traceback" not in err and err.count("\n") == 1
    assert re.search(message, err), err


def test_default_is_the_official_file_downloaded_once_into_the_keras_cache(one_unit_bit, tmp_path,
                                                                           monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    arrays = official_arrays(ONE_UNIT.units_per_block, ONE_UNIT.root_width)
    write_npz(served / "BiT-S-R50x1.npz", arrays)
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a fresh Keras cache
    monkeypatch.delenv("KERAS_HOME", raising=False)
    # The official address, with the host replaced by the local server.
    monkeypatch.setattr(bit_weights, "WEIGHTS_URL", f"http://127.0.0.1:{server.server_port}/{{name}}.npz")
    try:
        config = tiny_config(None)
        model = models.create_model(config, 3, SIZE)
        backbones.spec("bit").check_source(config)  # a second run finds the file in the cache
        monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
        backbones.spec("bit").check_source(config)  # $KERAS_HOME has a cache of its own
    finally:
        server.shutdown()
        server.server_close()
    assert requests == ["/BiT-S-R50x1.npz"] * 2
    assert (tmp_path / "home" / ".keras" / "models" / "BiT-S-R50x1.npz").is_file()
    assert (tmp_path / "keras_home" / "models" / "BiT-S-R50x1.npz").is_file()
    key = "resnet/root_block/standardized_conv2d/kernel"
    np.testing.assert_array_equal(bit_network.npz_variables(model.get_layer("backbone"))[key].numpy(),
                                  arrays[key])


def test_the_official_urls_and_pretrained_defaults():
    assert bit_weights.official_url("s-r50x3") == "https://storage.googleapis.com/bit_models/BiT-S-R50x3.npz"
    assert bit_weights.official_url("m-r152x2") == "https://storage.googleapis.com/bit_models/BiT-M-R152x2.npz"
    for variant in bit.VARIANTS:
        assert bit.architecture(variant).name().lower() == variant.split("-")[1]
    default = checks.resolve(config_lib.Config())
    assert default.model.backbone == "bit" and default.model.trainable is False
    scratch = checks.resolve(config_lib.override(config_lib.Config(), {"bit_weights": "none"}))
    assert scratch.model.trainable is True and scratch.train.learning_rate == 1e-3
    with pytest.raises(UserError, match="--bit_weights applies to --backbone=bit"):
        checks.resolve(config_lib.override(config_lib.Config(), {
            "backbone": "wide_resnet", "bit_weights": "none"}))


def fit(model, epochs=1, jit_compile=False):
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy", jit_compile=jit_compile)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
    model.fit(images, rng.integers(0, 3, 8), batch_size=4, epochs=epochs, verbose=0)


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_frozen_weights_stay_and_trainable_ones_learn_in_bfloat16(one_unit_bit, tmp_path, trainable):
    path = write_npz(tmp_path / "w.npz", official_arrays(ONE_UNIT.units_per_block, ONE_UNIT.root_width))
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = models.create_model(tiny_config(path, trainable=trainable), 3, SIZE)
    backbone = model.get_layer("backbone")
    # Frozen or not, the backbone computes in bfloat16.
    assert backbone.get_layer("block1_unit01_c_standardized_conv2d").output.dtype == tf.bfloat16
    before = [w.numpy().copy() for w in backbone.weights]
    fit(model)
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(before, backbone.weights)]
    assert all(changed) if trainable else not any(changed)
    assert all(w.dtype == tf.float32 for w in backbone.weights)
    assert np.any(model.get_layer("classifier").kernel.numpy())


@pytest.mark.slow
def test_xla_trains_without_retracing_per_step(one_unit_bit):
    model = models.create_model(tiny_config(trainable=True), 3, SIZE)
    fit(model, epochs=1, jit_compile=True)
    traces = model.train_function.experimental_get_tracing_count()
    before = [w.numpy().copy() for w in model.trainable_weights]
    # Two more epochs of two steps each, through the same compiled step.
    rng = np.random.default_rng(2)
    model.fit(rng.integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8), rng.integers(0, 3, 8),
             batch_size=4, epochs=2, verbose=0)
    assert model.train_function.experimental_get_tracing_count() == traces
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights))


@pytest.mark.slow
def test_exported_backbone_starts_the_next_run(one_unit_bit, tmp_path, capsys, images):
    first = tmp_path / "first"
    code, _, err = run_main(["--backbone=bit", "--bit_variant=s-r50x1", "--bit_weights=none",
                             "--dataset=synthetic", "--synthetic_examples=32", f"--image_size={SIZE}",
                             "--batch_size=8", "--epochs=1", "--precision=float32",
                             "--jit_compile=false", "--export_backbone", f"--workdir={first}"],
                            capsys)
    assert code == 0, err
    serve = tf.saved_model.load(str(first / export.EXPORT_DIR)).signatures["serving_default"]
    (probabilities,) = serve(image=tf.constant(images)).values()
    np.testing.assert_allclose(probabilities.numpy().sum(axis=1), 1.0, rtol=1e-5)
    exported = first / export.BACKBONE_EXPORT_DIR
    features = tf.saved_model.load(str(exported))(tf.constant(images / 255.0, tf.float32))
    assert features.shape == (3, 4 * ONE_UNIT.root_width) and features.dtype == tf.float32

    # The next run starts from it, frozen: a hub backbone in float32.
    config = checks.resolve(config_lib.override(experiments.preset(None), {
        "backbone": "hub", "hub_handle": str(exported), "trainable": False, "learning_rate": 1e-2,
        "dataset": "synthetic", "synthetic_examples": 32, "image_size": SIZE, "batch_size": 8,
        "epochs": 1, "precision": "float32", "jit_compile": "false", "export": False,
        "workdir": str(tmp_path / "second")}))
    summary = train.train_and_evaluate(config)
    assert summary["epochs_completed"] == 1 and summary["final_val_accuracy"] is not None
