"""The d2l chapter's exercises, measured: parameters and the memory autograd keeps for backward."""

import torch
from torch import nn

from conformance.specs import count_params, get_spec
from densenet_torch import DenseBlock, DenseNet
from densenet_torch.model import stem


def saved_for_backward_mib(net, size, batch=1):
    """Bytes of every distinct tensor autograd saves during one train-mode forward pass,
    the weights (which are kept anyway) left out."""
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    net.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        net(torch.randn(batch, 1, size, size)).sum()
    return sum(storages.values()) / 2**20


class NoTransitions(nn.Module):
    """The d2l net with its transition layers dropped: every block sees the stem's 24x24 at 96x96."""

    def __init__(self, spec):
        super().__init__()
        layers, channels = [module for _, module in stem(spec)], spec.num_init_features
        for num_convs in spec.block_config:
            layers.append(DenseBlock(num_convs, channels, spec.growth_rate))
            channels += num_convs * spec.growth_rate
        layers += [
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, spec.num_classes),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, X):
        return self.net(X)


d2l = get_spec("d2l")
variants = {
    "d2l (growth 32, transitions halve channels)": (DenseNet(d2l), d2l),
    "growth 16": (DenseNet(d2l.replace(growth_rate=16)), d2l.replace(growth_rate=16)),
    "growth 64": (DenseNet(d2l.replace(growth_rate=64)), d2l.replace(growth_rate=64)),
    "transitions keep every channel (compression 1)": (
        DenseNet(d2l.replace(compression=1.0)),
        d2l.replace(compression=1.0),
    ),
    "no transition layers": (NoTransitions(d2l), None),
    "d2l, memory-efficient (torchvision's memory_efficient=True)": (DenseNet(d2l, memory_efficient=True), d2l),
}
print("| variant | trainable parameters | activations kept for backward, one 96x96 image | one 224x224 image |")
print("| --- | ---: | ---: | ---: |")
for name, (net, spec) in variants.items():
    params = sum(p.numel() for p in net.parameters())
    if spec is not None:
        assert params == count_params(spec)[0], (name, params, count_params(spec))
    small, large = saved_for_backward_mib(net, 96), saved_for_backward_mib(net, 224)
    print(f"| {name} | {params:,} | {small:.1f} MiB | {large:.1f} MiB |")
