"""BatchNorm momentum (--batch_norm_momentum) reaches the BN layers a run trains from scratch."""

import numpy as np
import pytest
import tf_keras as keras

from trainer import checks
from trainer import config as config_lib
from trainer import models
from trainer.backbones import resnet50


def batch_norm_layers(layer):
    for inner in getattr(layer, "layers", []):
        if isinstance(inner, keras.layers.BatchNormalization):
            yield inner
        yield from batch_norm_layers(inner)


def model_config(**values):
    return checks.resolve(config_lib.override(config_lib.Config(), values)).model


def test_wide_resnet_gets_the_momentum():
    wide = models.create_model(model_config(backbone="wide_resnet", wrn_width=1), 3, 16)
    assert {layer.momentum for layer in batch_norm_layers(wide)} == {0.9}
    wide = models.create_model(model_config(backbone="wide_resnet", wrn_width=1,
                                            batch_norm_momentum=0.5), 3, 16)
    assert {layer.momentum for layer in batch_norm_layers(wide)} == {0.5}


@pytest.mark.slow
def test_resnet50_from_scratch_gets_the_momentum():
    resnet = models.create_model(model_config(backbone="resnet50", weights="none"), 3, 32)
    layers = list(batch_norm_layers(resnet))
    assert len(layers) == 53 and {layer.momentum for layer in layers} == {0.9}


def test_momentum_clone_keeps_the_weights_and_the_layer_names():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    original = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="net")
    original.get_layer("bn").set_weights([np.full(4, v, np.float32) for v in (2.0, 1.0, 0.5, 3.0)])
    clone = resnet50.with_batch_norm_momentum(original, 0.9)
    assert clone.get_layer("bn").momentum == 0.9 and original.get_layer("bn").momentum == 0.99
    assert [layer.name for layer in clone.layers] == [layer.name for layer in original.layers]
    for a, b in zip(clone.get_weights(), original.get_weights()):
        np.testing.assert_array_equal(a, b)
