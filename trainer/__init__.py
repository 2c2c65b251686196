"""Picks the Keras 2 API (tf_keras) before TensorFlow is first imported.

TensorFlow 2.21 defaults to Keras 3, but `hub.KerasLayer` is a tf_keras layer
and cannot be added to a Keras 3 model. Importing any `trainer` module imports
this package first, so this is the one place that makes the choice. A value the
user already set is respected.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ INFO lines (CPU feature notices) drown the training log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.1.0"
