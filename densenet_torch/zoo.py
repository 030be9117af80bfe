"""torchvision interop and the constructors torchvision users know.

torchvision's DenseNet module names are ours, so its state dicts are canonical states; the
files it publishes use the pre-2018 keys (`norm.1` for `norm1`), which `conformance.zoo`
renames. Files are read with `torch.load(weights_only=True)`: a pickle that would run code
is refused. `memory_efficient=True` is torchvision's option: the same weights, less memory.
"""

import argparse
import io
import pickle
import re

import numpy as np
import torch

from conformance import zoo
from conformance.files import atomic_write_bytes

from .model import DenseNet
from .weights import load_canonical


def read_zoo(path, fmt="torchvision"):
    """A torchvision state dict (either key layout), or a training checkpoint holding one, as
    (canonical state of NumPy arrays, notes); `conformance.zoo.from_checkpoint` finds the state."""
    try:
        # argparse.Namespace: the training arguments timm saves beside the weights; plain data
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        arrays = to_numpy(loaded)
    except pickle.UnpicklingError as error:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(error), re.S)
        reason = (found.group(1) if found else str(error)).strip()
        raise zoo.ZooError(
            f"{path} was refused by torch.load(weights_only=True): it is not a plain state dict of tensors "
            f"(a damaged file, or a pickle that would run code when loaded) ({reason})"
        ) from None
    except Exception as error:  # any parser failure of a file that is not torch.save's
        raise zoo.ZooError(
            f"{path} is not a readable torch.save file (truncated or corrupt?): {zoo.reason(error)}"
        ) from None
    return zoo.from_checkpoint(arrays, str(path))


def to_numpy(obj):
    """Tensors as NumPy arrays (floating ones as float32), inside dicts as deep as they go."""
    if isinstance(obj, torch.Tensor):
        return (obj.float() if obj.is_floating_point() else obj).detach().numpy()
    if isinstance(obj, dict):
        return {key: to_numpy(value) for key, value in obj.items()}
    return obj


def write_zoo(path, state, spec, fmt="torchvision", legacy=False):
    """A state dict that torchvision's `DenseNet.load_state_dict` takes (today's key layout)."""
    buffer = io.BytesIO()
    torch.save(
        {key: torch.from_numpy(value.copy()) for key, value in zoo.to_torchvision(state, legacy).items()}, buffer
    )
    atomic_write_bytes(path, buffer.getvalue())


def preprocess_input(images):
    """uint8 or [0, 255] float NCHW RGB images, normalised as torchvision's ImageNet models expect."""
    mean = torch.tensor(zoo.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(zoo.IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _densenet(name, weights=None, num_classes=1000, memory_efficient=False):
    spec, state = zoo.weights_for(name, weights, num_classes)
    model = DenseNet(spec, memory_efficient)
    if state is not None:
        load_canonical(model, state)
    return model


def densenet121(weights=None, num_classes=1000, memory_efficient=False):
    """torchvision's `densenet121`: `weights` is None or a path in any format `convert` reads."""
    return _densenet("densenet121", weights, num_classes, memory_efficient)


def densenet161(weights=None, num_classes=1000, memory_efficient=False):
    return _densenet("densenet161", weights, num_classes, memory_efficient)


def densenet169(weights=None, num_classes=1000, memory_efficient=False):
    return _densenet("densenet169", weights, num_classes, memory_efficient)


def densenet201(weights=None, num_classes=1000, memory_efficient=False):
    return _densenet("densenet201", weights, num_classes, memory_efficient)


def densenet264(weights=None, num_classes=1000, memory_efficient=False):
    return _densenet("densenet264", weights, num_classes, memory_efficient)


def zoo_sample(path, spec, x_nchw, seed=0):
    """torchvision's DenseNet (ours: the same modules) with random weights and BatchNorm statistics,
    saved in torchvision's published (pre-2018) key layout; returns its eval logits on `x_nchw`."""
    torch.manual_seed(seed)
    model = DenseNet(spec)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if ".norm" in key and not key.endswith("num_batches_tracked"):
                value.copy_(torch.from_numpy(zoo.random_bn(rng, key, tuple(value.shape))))
    write_zoo(
        path,
        {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")},
        spec,
        legacy=True,
    )
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x_nchw)).numpy()
