"""DenseNet in PyTorch (NCHW).

The d2l chapter's conv_block, DenseBlock, transition_block and DenseNet, grown to any
`DenseNetSpec` (bottleneck or not, compression, ImageNet or CIFAR stem). Module names are
torchvision's, so `state_dict()` keys are the canonical checkpoint keys. The chapter's four
come first; the extensions after them (memory-efficient recomputation, the input check) are
what torchvision's DenseNet adds, kept out of the listings.
"""

import contextlib
import functools
from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from conformance.specs import channel_plan, final_channels, get_spec, validate_input

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch's convention: weight of the new batch statistic


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def batch_norm(num_channels):
    return nn.BatchNorm2d(num_channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def conv(input_channels, num_channels, kernel_size, bias=True, stride=1):
    """A convolution padded by kernel_size // 2 on every side: the output keeps the input's size at stride 1."""
    return nn.Conv2d(input_channels, num_channels, kernel_size, stride, padding=kernel_size // 2, bias=bias)


def conv_block(input_channels, num_channels, bn_size=None, bias=True):
    """BN-ReLU-Conv(3x3); with `bn_size`, the bottleneck BN-ReLU-Conv(1x1)-BN-ReLU-Conv(3x3)."""
    if bn_size is None:
        layers = OrderedDict(
            norm1=batch_norm(input_channels),
            relu1=nn.ReLU(),
            conv1=conv(input_channels, num_channels, 3, bias),
        )
        return nn.Sequential(layers)
    width = bn_size * num_channels
    layers = OrderedDict(
        norm1=batch_norm(input_channels),
        relu1=nn.ReLU(),
        conv1=conv(input_channels, width, 1, bias),
        norm2=batch_norm(width),
        relu2=nn.ReLU(),
        conv2=conv(width, num_channels, 3, bias),
    )
    return nn.Sequential(layers)


class DenseBlock(nn.Module):
    """`num_convs` conv blocks; each one's output is concatenated to its input."""

    def __init__(self, num_convs, input_channels, num_channels, bn_size=None, bias=True, drop_rate=0.0):
        super().__init__()
        for i in range(num_convs):
            blk = conv_block(input_channels + i * num_channels, num_channels, bn_size, bias)
            self.add_module(f"denselayer{i + 1}", blk)
        self.drop_rate = drop_rate

    def forward(self, X):
        for blk in self.children():
            Y = F.dropout(blk(X), self.drop_rate, self.training)  # torchvision's drop_rate (0: none)
            X = torch.cat((X, Y), dim=1)  # concatenate the input and output of each block on the channels
        return X


def transition_block(input_channels, num_channels, bias=True):
    """BN-ReLU-Conv(1x1) to `num_channels`, then halve height and width."""
    layers = OrderedDict(
        norm=batch_norm(input_channels),
        relu=nn.ReLU(),
        conv=conv(input_channels, num_channels, 1, bias),
        pool=nn.AvgPool2d(kernel_size=2, stride=2),
    )
    return nn.Sequential(layers)


def stem(spec):
    """ImageNet: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool. CIFAR: one 3x3 conv."""
    if spec.stem == "cifar":
        return [("conv0", conv(spec.in_channels, spec.num_init_features, 3, spec.conv_bias))]
    return [
        ("conv0", conv(spec.in_channels, spec.num_init_features, 7, spec.conv_bias, stride=2)),
        ("norm0", batch_norm(spec.num_init_features)),
        ("relu0", nn.ReLU()),
        ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
    ]


class DenseNet(nn.Module):
    """Any spec (or its name): the stem, dense blocks with transition blocks between them,
    then BN, ReLU, global average pooling and a linear classifier."""

    __jit_ignored_attributes__ = ["spec"]  # TorchScript cannot compile the spec dataclass; only check_input reads it

    def __init__(self, spec, memory_efficient=False):
        super().__init__()
        self.spec = spec = get_spec(spec)
        dense_block = MemoryEfficientDenseBlock if memory_efficient else DenseBlock
        features = stem(spec)
        for stage in channel_plan(spec)[1:]:  # the widths of every stage, from the spec
            if stage.name.startswith("denseblock"):
                args = spec.growth_rate, spec.bn_size, spec.conv_bias, spec.drop_rate
                block = dense_block(len(stage.layers), stage.in_channels, *args)
            else:
                block = transition_block(stage.in_channels, stage.out_channels, spec.conv_bias)
            features.append((stage.name, block))
        num_features = final_channels(spec)
        features.append(("norm5", batch_norm(num_features)))
        self.features = nn.Sequential(OrderedDict(features))
        self.classifier = nn.Linear(num_features, spec.num_classes)

    def forward(self, X):
        if not torch.jit.is_scripting():  # a scripted model skips the check (and its clear message)
            check_input(self.spec, X, self.classifier.weight.dtype)
        X = F.relu(self.features(X))
        X = torch.flatten(F.adaptive_avg_pool2d(X, 1), 1)
        return self.classifier(X)


# Extensions: what torchvision's DenseNet adds to the chapter's.


@torch.fx.wrap  # FX records this call instead of tracing it: at trace time X.shape is a Proxy
def check_input(spec, X, dtype):
    """A clear error for a batch the model cannot take (NHWC, wrong channels or size, wrong dtype)."""
    validate_input(spec, X.shape, dtype_name(X.dtype), "NCHW", dtype_name(dtype))


class MemoryEfficientDenseBlock(DenseBlock):
    """torchvision's memory_efficient: the same block and parameters, keeping the list of feature
    maps instead of their concatenation, which each layer recomputes in the backward pass."""

    def forward(self, X):
        features = [X]
        for blk in self.children():
            if torch.jit.is_scripting():  # TorchScript cannot compile checkpoint: no recomputation there
                Y = blk(torch.cat(features, dim=1))
            else:
                Y = checkpointed_layer(blk, features)
            features.append(F.dropout(Y, self.drop_rate, self.training))
        return torch.cat(features, dim=1)


@contextlib.contextmanager
def running_stats_restored(layer):
    """Recomputing a train-mode BatchNorm moves its running statistics a second time: put them back."""
    saved = [buffer.clone() for buffer in layer.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(layer.buffers(), saved):
                buffer.copy_(value)


def recompute_contexts(layer):
    return contextlib.nullcontext(), running_stats_restored(layer)


def concat_bn_relu_conv(layer, *features):
    return layer[:3](torch.cat(features, dim=1))


def checkpointed_layer(layer, features):
    """One dense layer on the list of feature maps, its concatenation and first BN-ReLU
    recomputed in the backward pass (torchvision's `_DenseLayer.bn_function`; recomputation
    stops before conv1, whose output norm2 keeps anyway). Selective checkpointing of the whole
    layer keeping only convolution outputs kept less memory but ran slower on the CPU."""
    # torch.compile recomputes inside its own graph, where the statistics update stays in the forward pass
    contexts = {} if torch.compiler.is_compiling() else {"context_fn": functools.partial(recompute_contexts, layer)}
    Y = checkpoint(concat_bn_relu_conv, layer, *features, use_reentrant=False, **contexts)
    return layer[3:](Y)
