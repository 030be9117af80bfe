"""DenseNet in MXNet Gluon (NCHW), with the NumPy-compatible interface (mx.np, npx).

The d2l chapter's conv_block, DenseBlock, transition_block and DenseNet, grown to any
`DenseNetSpec` (bottleneck or not, compression, ImageNet or CIFAR stem). Every block is a
HybridBlock, so `hybridize()` compiles the whole network. Children carry torchvision's
names, so the parameters' structural names (what `save_parameters` writes) are the
canonical keys, with BatchNorm's gamma/beta for weight/bias.

Every layer is given its input width (in_channels, in_units): no deferred initialisation,
so `initialize()` allocates everything, `cast("float64")` works and a checkpoint loads
without a dummy forward pass.
"""

import warnings

import numpy as onp
from mxnet.gluon import nn
from mxnet.ndarray import NDArray
from mxnet.util import use_np

from conformance.specs import channel_plan, final_channels, get_spec, validate_input

from . import compat  # noqa: F401  (before mxnet)

# The package works in MXNet's NumPy mode (mx.np arrays in and out) only while its own code runs:
# `use_np` scopes it to a class's methods or a function, so the rest of the process (Gluon's own
# model zoo, legacy NDArray code) keeps MXNet's default mode. Gluon layers pick their operators
# when built, so blocks are built inside the scope too.

BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # MXNet's convention: weight of the old running statistic (PyTorch's 0.1)

NO_MEMORY_EFFICIENT = (
    "memory_efficient=True has no effect in MXNet 1.9: hybridized Gluon blocks (CachedOp) and "
    "imperative autograd build their backward graphs without MXNet's mirroring, which only the "
    "symbolic executor applies, and an autograd.Function checkpoint races with MXNet's engine "
    "(docs/memory.md). This is the plain network, with the same parameters and numbers."
)


def dtype_name(dtype):
    return onp.dtype(dtype).name


def sequential(**layers):
    """A HybridSequential whose children have names (norm1, conv1, ...), not 0, 1, 2."""
    net = nn.HybridSequential()
    for name, layer in layers.items():
        setattr(net, name, layer)  # Gluon registers a Block attribute as a child of that name
    return net


def batch_norm(num_channels):
    return nn.BatchNorm(epsilon=BN_EPS, momentum=BN_MOMENTUM, in_channels=num_channels)


def conv(input_channels, num_channels, kernel_size, bias=True, stride=1):
    """A convolution padded by kernel_size // 2 on every side: the output keeps the input's size at stride 1."""
    return nn.Conv2D(num_channels, kernel_size, stride, kernel_size // 2, use_bias=bias, in_channels=input_channels)


@use_np
def conv_block(input_channels, num_channels, bn_size=None, bias=True):
    """BN-ReLU-Conv(3x3); with `bn_size`, the bottleneck BN-ReLU-Conv(1x1)-BN-ReLU-Conv(3x3)."""
    if bn_size is None:
        return sequential(
            norm1=batch_norm(input_channels),
            relu1=nn.Activation("relu"),
            conv1=conv(input_channels, num_channels, 3, bias),
        )
    width = bn_size * num_channels
    return sequential(
        norm1=batch_norm(input_channels),
        relu1=nn.Activation("relu"),
        conv1=conv(input_channels, width, 1, bias),
        norm2=batch_norm(width),
        relu2=nn.Activation("relu"),
        conv2=conv(width, num_channels, 3, bias),
    )


@use_np
class DenseBlock(nn.HybridBlock):
    """`num_convs` conv blocks; each one's output is concatenated to its input."""

    def __init__(self, num_convs, input_channels, num_channels, bn_size=None, bias=True, drop_rate=0.0):
        super().__init__()
        self.blks = []
        for i in range(num_convs):
            self.blks.append(conv_block(input_channels + i * num_channels, num_channels, bn_size, bias))
            setattr(self, f"denselayer{i + 1}", self.blks[-1])  # Gluon registers a Block attribute as a child
        self.dropout = dropout(drop_rate)

    def hybrid_forward(self, F, X):
        for blk in self.blks:
            Y = self.dropout(blk(X))  # dropout: active only under autograd.record() or train_mode()
            X = F.np.concatenate((X, Y), axis=1)  # concatenate the input and output of each block on the channels
        return X


@use_np
def transition_block(input_channels, num_channels, bias=True):
    """BN-ReLU-Conv(1x1) to `num_channels`, then halve height and width."""
    return sequential(
        norm=batch_norm(input_channels),
        relu=nn.Activation("relu"),
        conv=conv(input_channels, num_channels, 1, bias),
        pool=nn.AvgPool2D(pool_size=2, strides=2),
    )


def stem(spec):
    """ImageNet: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool. CIFAR: one 3x3 conv."""
    if spec.stem == "cifar":
        return {"conv0": conv(spec.in_channels, spec.num_init_features, 3, spec.conv_bias)}
    return {
        "conv0": conv(spec.in_channels, spec.num_init_features, 7, spec.conv_bias, stride=2),
        "norm0": batch_norm(spec.num_init_features),
        "relu0": nn.Activation("relu"),
        "pool0": nn.MaxPool2D(pool_size=3, strides=2, padding=1),
    }


@use_np
class DenseNet(nn.HybridBlock):
    """Any spec (or its name): the stem, dense blocks with transition blocks between them,
    then BN, ReLU, global average pooling and a dense classifier."""

    def __init__(self, spec, memory_efficient=False):
        super().__init__()
        self.spec = spec = get_spec(spec)
        self.memory_efficient, self.memory_efficient_unsupported = (
            memory_efficient,
            no_memory_efficient(memory_efficient),
        )
        features = stem(spec)
        for stage in channel_plan(spec)[1:]:  # the widths of every stage, from the spec
            if stage.name.startswith("denseblock"):
                args = spec.growth_rate, spec.bn_size, spec.conv_bias, spec.drop_rate
                features[stage.name] = DenseBlock(len(stage.layers), stage.in_channels, *args)
            else:
                features[stage.name] = transition_block(stage.in_channels, stage.out_channels, spec.conv_bias)
        num_features = final_channels(spec)
        features["norm5"] = batch_norm(num_features)
        self.features = sequential(**features)
        self.pool = nn.GlobalAvgPool2D()
        self.classifier = nn.Dense(spec.num_classes, in_units=num_features)

    def forward(self, X):
        if isinstance(X, NDArray):  # checked here: hybrid_forward sees a shapeless Symbol once hybridized
            check_input(self.spec, X, self.classifier.weight.dtype)
        return super().forward(X)

    def hybrid_forward(self, F, X):
        X = F.npx.relu(self.features(X))
        return self.classifier(self.pool(X))


# Extensions: what torchvision's DenseNet adds to the chapter's.


def dropout(drop_rate):
    """torchvision's drop_rate, on each conv block's output before it is concatenated; at rate 0
    an identity (Gluon's Dropout(0) would still copy every output)."""
    return nn.Dropout(drop_rate) if drop_rate > 0 else nn.HybridLambda(lambda F, X: X)


def check_input(spec, X, dtype):
    """A clear error for a batch the model cannot take (NHWC, wrong channels or size, wrong dtype)."""
    validate_input(spec, X.shape, dtype_name(X.dtype), "NCHW", dtype_name(dtype))


def no_memory_efficient(memory_efficient):
    """torchvision's memory_efficient is accepted and does nothing here, with a warning; the
    reason why (the benchmark reads it), or "" when it was not asked for."""
    if not memory_efficient:
        return ""
    warnings.warn(NO_MEMORY_EFFICIENT, stacklevel=3)
    return NO_MEMORY_EFFICIENT
