"""DenseNet in Keras 3 on TensorFlow, NHWC."""

import os

# Keras 3 picks its backend once, at its first import: make it TensorFlow unless the user chose.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from .model import DenseBlock, DenseNet, conv_block, transition_block  # noqa: E402
from .weights import export_canonical, load_canonical  # noqa: E402
from .zoo import DenseNet121, DenseNet169, DenseNet201, preprocess_input  # noqa: E402

__all__ = [
    "DenseBlock",
    "DenseNet",
    "conv_block",
    "transition_block",
    "export_canonical",
    "load_canonical",
    "DenseNet121",
    "DenseNet169",
    "DenseNet201",
    "preprocess_input",
]
