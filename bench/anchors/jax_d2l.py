"""The d2l book's JAX/Flax DenseNet and training loop, with optax: the anchor that
`make bench` times the project's JAX trainer against. Imports jax, flax, optax and numpy only.

Kept from the book (chapter "Densely Connected Networks", `d2l.Trainer` for JAX):
`ConvBlock`, `DenseBlock` and `TransitionBlock` as Flax linen modules with a `training`
attribute, the net as one `nn.Sequential`, Flax's default initialisers and BatchNorm
settings, a `TrainState` carrying `batch_stats`, `optax.sgd` on
`optax.softmax_cross_entropy_with_integer_labels`, and the book's step (`d2l.Trainer.fit_epoch`,
`Classifier.training_step`): only the loss is jitted; `jax.value_and_grad` around it and the
optax update (`TrainState.apply_gradients`) run eagerly, and the loss is moved to the host
without waiting for it (the book's plot averages it later). `CompiledAnchor` is the same
model with the whole step (forward, backward, update) in one `jax.jit`, as Flax's own
examples write it. The
book's bugs, fixed: its stride-2 stem conv and max-pool use `padding='same'`, which pads
asymmetrically on even inputs (here explicit symmetric padding), and its transition layers
take stale channel counts (here each halves the channels its dense block produced).
Added: an optional 1x1 bottleneck (the paper's DenseNet-B) so the same code also builds
densenet121.
"""

from functools import partial
from typing import Any

import flax
import jax
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state
from jax import numpy as jnp


class ConvBlock(nn.Module):
    num_channels: int
    bn_size: Any = None
    bias: bool = True
    training: bool = True

    @nn.compact
    def __call__(self, X):
        Y = X
        if self.bn_size:  # DenseNet-B: BN-ReLU-Conv(1x1) to bn_size * growth channels first
            Y = nn.relu(nn.BatchNorm(not self.training)(Y))
            Y = nn.Conv(self.bn_size * self.num_channels, kernel_size=(1, 1), use_bias=self.bias)(Y)
        Y = nn.relu(nn.BatchNorm(not self.training)(Y))
        Y = nn.Conv(self.num_channels, kernel_size=(3, 3), padding=(1, 1), use_bias=self.bias)(Y)
        return jnp.concatenate((X, Y), axis=-1)


class DenseBlock(nn.Module):
    num_convs: int
    num_channels: int
    bn_size: Any = None
    bias: bool = True
    training: bool = True

    def setup(self):
        self.net = nn.Sequential(
            [ConvBlock(self.num_channels, self.bn_size, self.bias, self.training) for _ in range(self.num_convs)]
        )

    def __call__(self, X):
        return self.net(X)


class TransitionBlock(nn.Module):
    num_channels: int
    bias: bool = True
    training: bool = True

    @nn.compact
    def __call__(self, X):
        X = nn.BatchNorm(not self.training)(X)
        X = nn.relu(X)
        X = nn.Conv(self.num_channels, kernel_size=(1, 1), use_bias=self.bias)(X)
        return nn.avg_pool(X, window_shape=(2, 2), strides=(2, 2))


class DenseNet(nn.Module):
    num_channels: int = 64
    growth_rate: int = 32
    arch: tuple = (4, 4, 4, 4)
    in_channels: int = 1
    num_classes: int = 10
    bn_size: Any = None
    bias: bool = True
    training: bool = True

    def setup(self):
        self.net = nn.Sequential(
            self.b1()
            + self.blocks()
            + [
                nn.BatchNorm(not self.training),
                nn.relu,
                lambda x: x.mean(axis=(1, 2)),  # global average pooling
                nn.Dense(self.num_classes),
            ]
        )

    def b1(self):
        return [
            nn.Conv(self.num_channels, kernel_size=(7, 7), strides=(2, 2), padding=(3, 3), use_bias=self.bias),
            nn.BatchNorm(not self.training),
            nn.relu,
            lambda x: nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1))),
        ]

    def blocks(self):
        layers, num_channels = [], self.num_channels
        for i, num_convs in enumerate(self.arch):
            layers.append(DenseBlock(num_convs, self.growth_rate, self.bn_size, self.bias, self.training))
            num_channels += num_convs * self.growth_rate
            if i != len(self.arch) - 1:  # a transition layer halves the channels between dense blocks
                num_channels //= 2
                layers.append(TransitionBlock(num_channels, self.bias, self.training))
        return layers

    def __call__(self, X):
        return self.net(X)


def densenet(**arch):
    return DenseNet(**{**arch, "arch": tuple(arch.get("arch", (4, 4, 4, 4)))})


class TrainState(train_state.TrainState):
    batch_stats: Any


def pick_device(device):
    if device == "gpu":
        try:
            return jax.devices("gpu")[0], ""
        except RuntimeError:
            return jax.devices("cpu")[0], "JAX sees no GPU; ran on the CPU"
    return jax.devices("cpu")[0], ""


@partial(jax.jit, static_argnums=0)
def loss(net, params, batch_stats, images, y):
    """The book's `Classifier.loss` with BatchNorm: the only jitted part of its step."""
    X = images[..., None].astype(jnp.float32) / 255
    y_hat, updates = net.apply({"params": params, "batch_stats": batch_stats}, X, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(y_hat, y).mean(), updates


def book_step(net, state, images, y):
    """`fit_epoch`'s body: value_and_grad of the jitted loss, then the optax update, eagerly."""
    (l, updates), grads = jax.value_and_grad(loss, argnums=1, has_aux=True)(
        net, state.params, state.batch_stats, images, y
    )
    state = state.apply_gradients(grads=grads)
    return state.replace(batch_stats=updates["batch_stats"]), l


compiled_step = jax.jit(book_step, static_argnums=0)


@partial(jax.jit, static_argnums=0)
def eval_logits(net, variables, images):
    return net.apply(variables, images[..., None].astype(jnp.float32) / 255)


class Anchor:
    """The book's net and its SGD step (only the loss jitted) on `device` ("cpu" or "gpu")."""

    train_step = staticmethod(book_step)

    def __init__(self, arch, lr, device="cpu"):
        self.device, self.note = pick_device(device)
        self.net = densenet(**arch)
        x = jnp.zeros((1, 32, 32, arch.get("in_channels", 1)))
        variables = jax.jit(self.net.init)(jax.random.key(0), x)
        state = TrainState.create(
            apply_fn=self.net.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=optax.sgd(lr)
        )
        self.state = jax.device_put(state, self.device)

    @property
    def device_name(self):
        return (
            "cpu"
            if self.device.platform == "cpu"
            else f"{self.device.platform}:{self.device.id} {self.device.device_kind}"
        )

    def num_params(self):
        return sum(p.size for p in jax.tree_util.tree_leaves(self.state.params))

    def step(self, images, labels):
        """One SGD step on uint8 (N, H, W) images; its mean loss, on its way to the host."""
        images, labels = jax.device_put((images, labels.astype(np.int32)), self.device)
        self.state, l = self.train_step(self.net, self.state, images, labels)
        return jax.device_put(l, jax.devices("cpu")[0])  # as the book's plot: no wait

    def logits(self, images):
        variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        return np.asarray(eval_logits(self.net.clone(training=False), variables, jax.device_put(images, self.device)))

    def wait(self):
        """Until the last update has run: the loss on its way to the host does not wait for it."""
        jax.block_until_ready(self.state)


class CompiledAnchor(Anchor):
    """The book's net with the whole step in one `jax.jit`."""

    train_step = staticmethod(compiled_step)


def gpu_bytes_in_use():
    try:
        stats = jax.devices("gpu")[0].memory_stats() or {}
    except RuntimeError:
        return None
    return int(stats["bytes_in_use"]) if "bytes_in_use" in stats else None


def gpu_peak_bytes():
    """The peak of JAX's allocator on the first GPU; None on the CPU (JAX cannot reset it)."""
    try:
        stats = jax.devices("gpu")[0].memory_stats() or {}
    except RuntimeError:
        return None
    return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def versions():
    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__}
