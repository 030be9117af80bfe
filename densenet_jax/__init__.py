"""DenseNet in JAX/Flax linen, NHWC."""

from .model import ConvBlock, DenseBlock, DenseNet, TransitionBlock
from .weights import export_canonical, load_canonical
from .zoo import DenseNet121, DenseNet161, DenseNet169, DenseNet201, DenseNet264, preprocess_input

__all__ = [
    "ConvBlock",
    "DenseBlock",
    "DenseNet",
    "TransitionBlock",
    "export_canonical",
    "load_canonical",
    "DenseNet121",
    "DenseNet161",
    "DenseNet169",
    "DenseNet201",
    "DenseNet264",
    "preprocess_input",
]
