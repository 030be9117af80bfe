"""DenseNet in Flax linen (NHWC).

The d2l chapter's ConvBlock, DenseBlock, TransitionBlock and DenseNet, grown to any
`DenseNetSpec` (bottleneck or not, compression, ImageNet or CIFAR stem). Submodule names
are torchvision's (conv0, denseblock1/denselayer1/norm1, transition1/conv, norm5,
classifier), so a variable's path in `params` or `batch_stats` spells its canonical key.
Linen modules hold no state: `init` returns the variables and `apply` takes them. The
chapter's four come first; the extensions after them (memory-efficient recomputation, the input
check) are what torchvision's DenseNet adds, kept out of the listings.
"""

import dataclasses
from functools import cache, partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from conformance.specs import DenseNetSpec, channel_plan, get_spec, min_input_size, validate_input

BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # Flax's convention: weight of the old running statistic (PyTorch's 0.1)


def dtype_name(dtype):
    return jnp.dtype(dtype).name


def batch_norm(train, dtype, name):
    # Flax's default momentum is 0.99. The variance is mean((x - mean)^2) like the others, not
    # the one pass mean(x^2) - mean^2, except in bfloat16: Flax computes the statistics in float32,
    # where the one pass errs far below bfloat16's own rounding, and saves a pass over x.
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPS,
        use_fast_variance=dtype == jnp.bfloat16,
        dtype=dtype,
        param_dtype=dtype,
        name=name,
    )


def conv(num_channels, kernel_size, bias=True, stride=1, name=None, dtype=jnp.float32):
    """Explicit, symmetric padding by kernel_size // 2: padding='SAME' pads a stride-2 layer on one side only."""
    pad = kernel_size // 2
    padding = ((pad, pad), (pad, pad))
    return nn.Conv(
        num_channels, (kernel_size,) * 2, stride, padding, use_bias=bias, dtype=dtype, param_dtype=dtype, name=name
    )


class ConvBlock(nn.Module):
    """BN-ReLU-Conv(3x3); with `bn_size`, the bottleneck BN-ReLU-Conv(1x1)-BN-ReLU-Conv(3x3)."""

    num_channels: int
    bn_size: int | None = None
    bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, X, train: bool):
        X = nn.relu(batch_norm(train, self.dtype, "norm1")(X))
        if self.bn_size is None:
            return conv(self.num_channels, 3, self.bias, name="conv1", dtype=self.dtype)(X)
        X = conv(self.bn_size * self.num_channels, 1, self.bias, name="conv1", dtype=self.dtype)(X)
        X = nn.relu(batch_norm(train, self.dtype, "norm2")(X))
        return conv(self.num_channels, 3, self.bias, name="conv2", dtype=self.dtype)(X)


class DenseBlock(nn.Module):
    """`num_convs` conv blocks; each one's output is concatenated to its input."""

    num_convs: int
    num_channels: int
    bn_size: int | None = None
    bias: bool = True
    drop_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, X, train: bool):
        for i in range(self.num_convs):
            blk = ConvBlock(self.num_channels, self.bn_size, self.bias, self.dtype, name=f"denselayer{i + 1}")
            Y = nn.Dropout(self.drop_rate, deterministic=not train)(blk(X, train))  # torchvision's drop_rate (0: none)
            X = jnp.concatenate((X, Y), axis=-1)  # concatenate the input and output of each block on the channels
        return X


class TransitionBlock(nn.Module):
    """BN-ReLU-Conv(1x1) to `num_channels`, then halve height and width."""

    num_channels: int
    bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, X, train: bool):
        X = nn.relu(batch_norm(train, self.dtype, "norm")(X))
        X = conv(self.num_channels, 1, self.bias, name="conv", dtype=self.dtype)(X)
        return nn.avg_pool(X, window_shape=(2, 2), strides=(2, 2))


def stem(spec, X, train, dtype):
    """ImageNet: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool. CIFAR: one 3x3 conv.

    Called inside DenseNet's compact __call__, so its layers become DenseNet's submodules."""
    if spec.stem == "cifar":
        return conv(spec.num_init_features, 3, spec.conv_bias, name="conv0", dtype=dtype)(X)
    X = conv(spec.num_init_features, 7, spec.conv_bias, stride=2, name="conv0", dtype=dtype)(X)
    X = nn.relu(batch_norm(train, dtype, "norm0")(X))
    # Zeros pad exactly like -inf here: the inputs follow a ReLU, so they are all >= 0. (Padding
    # inside nn.max_pool would do the same, but jax2onnx 0.17 drops it when exporting to ONNX.)
    X = jnp.pad(X, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return nn.max_pool(X, window_shape=(3, 3), strides=(2, 2))


class DenseNet(nn.Module):
    """Any spec (or its name): the stem, dense blocks with transition blocks between them,
    then BN, ReLU, global average pooling and a dense classifier. The stem's output is sown
    into 'intermediates' (the blocks' outputs are there too when `apply` captures intermediates)."""

    spec: DenseNetSpec | str
    dtype: Any = jnp.float32
    memory_efficient: bool = False  # torchvision's name: recompute concatenations and BN-ReLUs in backward

    @nn.compact
    def __call__(self, X, train: bool):
        spec = get_spec(self.spec)
        check_input(spec, X, self.dtype)
        dense_block = MemoryEfficientDenseBlock if self.memory_efficient else DenseBlock
        X = stem(spec, X, train, self.dtype)
        self.sow("intermediates", "stem", X)
        for stage in channel_plan(spec)[1:]:  # the widths of every stage, from the spec
            if stage.name.startswith("denseblock"):
                args = spec.growth_rate, spec.bn_size, spec.conv_bias, spec.drop_rate, self.dtype
                X = dense_block(len(stage.layers), *args, name=stage.name)(X, train)
            else:
                X = TransitionBlock(stage.out_channels, spec.conv_bias, self.dtype, name=stage.name)(X, train)
        X = nn.relu(batch_norm(train, self.dtype, "norm5")(X))
        X = X.mean(axis=(1, 2))
        return nn.Dense(spec.num_classes, dtype=self.dtype, param_dtype=self.dtype, name="classifier")(X)


# Extensions: what torchvision's DenseNet adds to the chapter's.


def check_input(spec, X, dtype):
    """A clear error for a batch the model cannot take (NCHW, wrong channels or size, wrong dtype)."""
    validate_input(spec, X.shape, dtype_name(X.dtype), "NHWC", dtype_name(dtype))


class MemoryEfficientDenseBlock(DenseBlock):
    """torchvision's memory_efficient: the same block and variables, keeping the list of feature
    maps instead of their concatenation, which each layer (CheckpointedLayer) recomputes in the
    backward pass. The dropout layers are the plain block's, so they draw the same masks."""

    @nn.compact
    def __call__(self, X, train: bool):
        features = [X]
        for i in range(self.num_convs):
            blk = CheckpointedLayer(self.num_channels, self.bn_size, self.bias, self.dtype, name=f"denselayer{i + 1}")
            features.append(nn.Dropout(self.drop_rate, deterministic=not train)(blk(features, train)))
        return jnp.concatenate(features, axis=-1)


class ConcatConvBlock(ConvBlock):
    """ConvBlock on a list of feature maps, which it concatenates first."""

    def __call__(self, features, train: bool):
        return super().__call__(jnp.concatenate(features, axis=-1), train)


# One dense layer on the block's list of feature maps, recomputed in the backward pass except
# for what its convolutions output (the dots policy saves conv_general_dilated's results): the
# concatenation and the BN-ReLUs are recomputed. Flax's remat keeps the module's name (so its
# variables' paths) and returns the BatchNorm statistics of the forward pass only. `train` is
# argument 2 counting `self`, static because it picks Python branches. The steps in train.py are
# compiled with KEEP_REMAT, without which XLA's CPU compiler merges the recomputation back.
CheckpointedLayer = nn.remat(ConcatConvBlock, static_argnums=(2,), policy=jax.checkpoint_policies.dots_saveable)


@cache  # modules with the same fields are equal: one trace per spec and dtype
def variable_shapes(module):
    """What `module.init` would return ({'params', 'batch_stats'}), as shapes and dtypes only:
    jax.eval_shape traces the network on the smallest input and computes nothing."""
    spec = get_spec(module.spec)
    size = min_input_size(spec)
    X = jax.ShapeDtypeStruct((1, size, size, spec.in_channels), module.dtype)
    return jax.eval_shape(partial(module.init, train=False), jax.random.key(0), X)


@dataclasses.dataclass
class Model:
    """A DenseNet module and its variables, which PyTorch keeps in one object and Flax apart:
    the module is a stateless description, `variables` holds 'params' and 'batch_stats'."""

    module: DenseNet
    variables: dict
