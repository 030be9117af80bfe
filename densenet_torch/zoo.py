"""torchvision interop and the constructors torchvision users know.

torchvision's DenseNet module names are ours, so its state dicts are canonical states; the
files it publishes use the pre-2018 keys (`norm.1` for `norm1`), which `conformance.zoo`
renames. Files are read with `torch.load(weights_only=True)`: a pickle that would run code
is refused. `memory_efficient=True` is torchvision's option: the same weights, less memory.
"""

import io
import pickle

import numpy as np
import torch

from conformance import zoo
from conformance.files import atomic_write_bytes

from .model import DenseNet
from .weights import load_canonical


def read_zoo(path, fmt="torchvision"):
    """A torchvision state dict (either key layout) as a canonical state of NumPy arrays."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise zoo.ZooError(
            f"{path} was refused by torch.load(weights_only=True): it is not a plain state dict "
            f"and loading it would run code from the file ({str(error).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise zoo.ZooError(f"{path} is not a readable torch.save file (truncated or corrupt?): {error}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise zoo.ZooError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return zoo.from_torchvision({key: value.float().numpy() for key, value in state.items()})


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
