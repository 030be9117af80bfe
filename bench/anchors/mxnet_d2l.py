"""The d2l book's MXNet Gluon DenseNet, trained the way the book trains it: the anchor that
`make bench` times the project's MXNet trainer against. Imports mxnet and numpy only
(densenet_mxnet.compat first: MXNet 1.9.1 cannot import under NumPy 2 without it).

Kept from the book (chapter "Densely Connected Networks", `d2l.train_ch6`): `conv_block`
and `transition_block` as `nn.Sequential`s, `DenseBlock` as an imperative `nn.Block` with
`np.concatenate`, the net as one `nn.Sequential` (so nothing is hybridized: the book's code
runs imperatively), `init.Xavier()`, `gluon.Trainer` with 'sgd' on
`SoftmaxCrossEntropyLoss`, `autograd.record()` and `trainer.step(batch_size)`, and the loss
and the number of correct predictions read on the host every step (the book's
`Accumulator`). Added: an optional 1x1 bottleneck (the paper's DenseNet-B, one of the
chapter's exercises) so that the same code also builds densenet121.
"""

import densenet_mxnet.compat  # noqa: F401  (NumPy 2 shim; must come before mxnet)

# isort: split
import mxnet as mx
import numpy
from mxnet import autograd, gluon, init, np, npx
from mxnet.gluon import nn

npx.set_np()


def conv_block(num_channels, bn_size=None, bias=True):
    blk = nn.Sequential()
    if bn_size:  # DenseNet-B: BN-ReLU-Conv(1x1) to bn_size * growth channels first
        blk.add(nn.BatchNorm(), nn.Activation("relu"), nn.Conv2D(bn_size * num_channels, kernel_size=1, use_bias=bias))
    blk.add(nn.BatchNorm(), nn.Activation("relu"), nn.Conv2D(num_channels, kernel_size=3, padding=1, use_bias=bias))
    return blk


class DenseBlock(nn.Block):
    def __init__(self, num_convs, num_channels, bn_size=None, bias=True, **kwargs):
        super().__init__(**kwargs)
        self.net = nn.Sequential()
        for _ in range(num_convs):
            self.net.add(conv_block(num_channels, bn_size, bias))

    def forward(self, X):
        for blk in self.net:
            Y = blk(X)
            X = np.concatenate((X, Y), axis=1)  # concatenate input and output on the channel axis
        return X


def transition_block(num_channels, bias=True):
    blk = nn.Sequential()
    blk.add(
        nn.BatchNorm(),
        nn.Activation("relu"),
        nn.Conv2D(num_channels, kernel_size=1, use_bias=bias),
        nn.AvgPool2D(pool_size=2, strides=2),
    )
    return blk


def densenet(
    num_channels=64, growth_rate=32, arch=(4, 4, 4, 4), in_channels=1, num_classes=10, bn_size=None, bias=True
):
    net = nn.Sequential()
    net.add(
        nn.Conv2D(num_channels, kernel_size=7, strides=2, padding=3, use_bias=bias, in_channels=in_channels),
        nn.BatchNorm(),
        nn.Activation("relu"),
        nn.MaxPool2D(pool_size=3, strides=2, padding=1),
    )
    for i, num_convs in enumerate(arch):
        net.add(DenseBlock(num_convs, growth_rate, bn_size, bias))
        num_channels += num_convs * growth_rate
        if i != len(arch) - 1:  # a transition layer halves the channels between dense blocks
            num_channels //= 2
            net.add(transition_block(num_channels, bias))
    net.add(nn.BatchNorm(), nn.Activation("relu"), nn.GlobalAvgPool2D(), nn.Dense(num_classes))
    return net


def pick_context(device):
    if device != "gpu":
        return mx.cpu(), ""
    try:
        (np.ones((2, 2), ctx=mx.gpu(0)) * 2).asnumpy()
        return mx.gpu(0), ""
    except mx.MXNetError:  # no CUDA build, no GPU, or no kernels for it (Hopper)
        return mx.cpu(), "MXNet cannot run on gpu(0) here; ran on the CPU"


class Anchor:
    """The book's net and its `train_ch6` step on `device` ("cpu" or "gpu")."""

    def __init__(self, arch, lr, device="cpu"):
        self.ctx, self.note = pick_context(device)
        self.net = densenet(**arch)
        self.net.initialize(force_reinit=True, ctx=self.ctx, init=init.Xavier())
        self.net(np.zeros((1, arch.get("in_channels", 1), 32, 32), ctx=self.ctx))  # Gluon infers shapes lazily
        self.trainer = gluon.Trainer(self.net.collect_params(), "sgd", {"learning_rate": lr})
        self.loss = gluon.loss.SoftmaxCrossEntropyLoss()

    @property
    def device_name(self):
        return "cpu" if self.ctx.device_type == "cpu" else f"gpu({self.ctx.device_id})"

    def num_params(self):
        return sum(p.data().size for p in self.net.collect_params().values() if p.grad_req != "null")

    def _inputs(self, images):
        return np.expand_dims(np.array(images, ctx=self.ctx), 1).astype("float32") / 255

    def step(self, images, labels):
        """One SGD step on uint8 (N, H, W) images; its mean loss, read on the host every step
        with the number of correct predictions, as `train_ch6` adds both to its metrics."""
        X, y = self._inputs(images), np.array(labels.astype("int32"), ctx=self.ctx)
        with autograd.record():
            y_hat = self.net(X)
            l = self.loss(y_hat, y)
        l.backward()
        self.trainer.step(X.shape[0])
        self.correct = int((y_hat.argmax(axis=1).astype(y.dtype) == y).sum())
        return float(l.mean())

    def logits(self, images):
        return self.net(self._inputs(images)).asnumpy()

    def wait(self):
        """Until the last update has run: the loss read back was computed before it."""
        npx.waitall()


def gpu_peak_bytes():
    """MXNet reports no allocator peak; None (the harness falls back to the process's RSS)."""
    return None


def versions():
    return {"mxnet": mx.__version__, "numpy": numpy.__version__}
