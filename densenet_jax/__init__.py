"""DenseNet in JAX/Flax linen, NHWC."""

from .model import ConvBlock, DenseBlock, DenseNet, TransitionBlock
from .weights import export_canonical, load_canonical

__all__ = ["ConvBlock", "DenseBlock", "DenseNet", "TransitionBlock", "export_canonical", "load_canonical"]
