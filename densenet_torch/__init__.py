"""DenseNet in PyTorch, NCHW."""

from .model import DenseBlock, DenseNet, conv_block, transition_block
from .weights import export_canonical, load_canonical
from .zoo import densenet121, densenet161, densenet169, densenet201, densenet264, preprocess_input

__all__ = [
    "DenseBlock",
    "DenseNet",
    "conv_block",
    "transition_block",
    "export_canonical",
    "load_canonical",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet264",
    "preprocess_input",
]
