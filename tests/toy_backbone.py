"""A toy backbone for tests, declared as any backbone is: one convolution and a global average pool.

tests/test_backbones.py registers it with one line (its module path added to
trainer.backbones.MODULES) and runs it end to end; no other file knows it.
"""

from trainer.backbones import LAYER_NAME, Spec


def build(config, image_size):
    import tf_keras as keras

    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name=LAYER_NAME)


SPECS = (Spec(name="toy", description="one convolution and a global average pool (tests only)",
              build=build, input_range="[0,1]", weights=lambda config: "toy (random)"),)
