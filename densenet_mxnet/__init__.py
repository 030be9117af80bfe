"""DenseNet in MXNet Gluon, NCHW, with the NumPy-compatible interface (mx.np, npx)."""

from . import compat  # noqa: F401  (first: makes mxnet importable under NumPy 2)
from .model import DenseBlock, DenseNet, conv_block, transition_block
from .weights import export_canonical, load_canonical
from .zoo import densenet121, densenet161, densenet169, densenet201, get_model, preprocess_input

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
    "get_model",
    "preprocess_input",
]
