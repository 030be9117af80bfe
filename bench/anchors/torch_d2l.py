"""The d2l book's PyTorch DenseNet, trained the way the book trains it: the anchor that
`make bench` times the project's PyTorch trainer against. Imports torch and numpy only.

Kept from the book (chapter "Densely Connected Networks", `d2l.train_ch6`): `conv_block`,
`DenseBlock`, `transition_block` and `b1` as `nn.Sequential`s, the net as one
`nn.Sequential`, Xavier-uniform initialisation of conv and linear weights,
`torch.optim.SGD` on `nn.CrossEntropyLoss`, an eager loop that copies each batch to the
device and reads the loss and the number of correct predictions back every step (the
book's `Accumulator`). Changed: global *average* pooling before the classifier (the paper's;
one edition of the book pools with a max), and an optional 1x1 bottleneck (the paper's
DenseNet-B, one of the chapter's exercises) so that the same code also builds densenet121.
"""

import numpy as np
import torch
from torch import nn


def conv_block(input_channels, num_channels, bn_size=None, bias=True):
    layers = []
    if bn_size:  # DenseNet-B: BN-ReLU-Conv(1x1) to bn_size * growth channels first
        layers += [
            nn.BatchNorm2d(input_channels),
            nn.ReLU(),
            nn.Conv2d(input_channels, bn_size * num_channels, kernel_size=1, bias=bias),
        ]
        input_channels = bn_size * num_channels
    return nn.Sequential(
        *layers,
        nn.BatchNorm2d(input_channels),
        nn.ReLU(),
        nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1, bias=bias),
    )


class DenseBlock(nn.Module):
    def __init__(self, num_convs, input_channels, num_channels, bn_size=None, bias=True):
        super().__init__()
        self.net = nn.Sequential(
            *[conv_block(num_channels * i + input_channels, num_channels, bn_size, bias) for i in range(num_convs)]
        )

    def forward(self, X):
        for blk in self.net:
            Y = blk(X)
            X = torch.cat((X, Y), dim=1)  # concatenate input and output on the channel axis
        return X


def transition_block(input_channels, num_channels, bias=True):
    return nn.Sequential(
        nn.BatchNorm2d(input_channels),
        nn.ReLU(),
        nn.Conv2d(input_channels, num_channels, kernel_size=1, bias=bias),
        nn.AvgPool2d(kernel_size=2, stride=2),
    )


def densenet(
    num_channels=64, growth_rate=32, arch=(4, 4, 4, 4), in_channels=1, num_classes=10, bn_size=None, bias=True
):
    b1 = nn.Sequential(
        nn.Conv2d(in_channels, num_channels, kernel_size=7, stride=2, padding=3, bias=bias),
        nn.BatchNorm2d(num_channels),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    blks = []
    for i, num_convs in enumerate(arch):
        blks.append(DenseBlock(num_convs, num_channels, growth_rate, bn_size, bias))
        num_channels += num_convs * growth_rate
        if i != len(arch) - 1:  # a transition layer halves the channels between dense blocks
            blks.append(transition_block(num_channels, num_channels // 2, bias))
            num_channels = num_channels // 2
    return nn.Sequential(
        b1,
        *blks,
        nn.BatchNorm2d(num_channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(num_channels, num_classes),
    )


def init_weights(m):
    if type(m) in (nn.Linear, nn.Conv2d):
        nn.init.xavier_uniform_(m.weight)


def pick_device(device):
    if device == "gpu" and torch.cuda.is_available():
        return torch.device("cuda"), ""
    return torch.device("cpu"), ("PyTorch sees no CUDA device; ran on the CPU" if device == "gpu" else "")


class Anchor:
    """The book's net and its `train_ch6` step on `device` ("cpu" or "gpu")."""

    def __init__(self, arch, lr, device="cpu"):
        self.device, self.note = pick_device(device)
        self.net = densenet(**arch)
        self.net.apply(init_weights)
        self.net.to(self.device)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=lr)
        self.loss = nn.CrossEntropyLoss()

    @property
    def device_name(self):
        return f"cuda {torch.cuda.get_device_name()}" if self.device.type == "cuda" else "cpu"

    def num_params(self):
        return sum(p.numel() for p in self.net.parameters())

    def step(self, images, labels):
        """One SGD step on uint8 (N, H, W) images; its mean loss, read on the host every step
        with the number of correct predictions, as `train_ch6` adds both to its metrics."""
        X = torch.from_numpy(images).to(self.device).unsqueeze(1).float() / 255
        y = torch.from_numpy(labels).long().to(self.device)
        self.net.train()
        self.optimizer.zero_grad()
        y_hat = self.net(X)
        l = self.loss(y_hat, y)
        l.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.correct = int((y_hat.argmax(dim=1) == y).sum())
            return float(l)

    @torch.no_grad()
    def logits(self, images):
        self.net.eval()
        X = torch.from_numpy(images).to(self.device).unsqueeze(1).float() / 255
        return self.net(X).cpu().numpy()

    def wait(self):
        """Until the last update has run: the loss read back was computed before it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def gpu_peak_bytes():
    """The CUDA caching allocator's peak in this process; None on the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return None


def gpu_bytes_in_use():
    return int(torch.cuda.memory_allocated()) if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def gpu_reset_peak():
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


def versions():
    return {"torch": torch.__version__, "numpy": np.__version__}
