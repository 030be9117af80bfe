"""DenseNet in PyTorch, NCHW."""

from .model import DenseBlock, DenseNet, conv_block, transition_block
from .weights import export_canonical, load_canonical

__all__ = ["DenseBlock", "DenseNet", "conv_block", "transition_block", "export_canonical", "load_canonical"]
