"""Canonical weights in and out of a Keras DenseNet.

The layers carry torchvision's module names, so a variable's path is its canonical key
in another spelling: 'features/denseblock1/denselayer1/norm1/gamma' is
'features.denseblock1.denselayer1.norm1.weight'. Layouts differ: Keras keeps conv kernels
HWIO and dense kernels (in, out), the canonical format OIHW and (out, in).
"""

import numpy as np

from conformance.weights import hwio_to_oihw, oihw_to_hwio, validate_state

CANONICAL_NAMES = {
    "kernel": "weight",
    "bias": "bias",  # Conv2D, Dense
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}


def canonical_key(model, path):
    """A variable path below `model` as its canonical key."""
    module, name = path.removeprefix(f"{model.path}/").rsplit("/", 1)
    return f"{module.replace('/', '.')}.{CANONICAL_NAMES[name]}"


def canonical_variables(model):
    """Canonical key -> Keras variable, in network order (no dropout seeds: `weights` omits them)."""
    return {canonical_key(model, variable.path): variable for variable in model.weights}


def load_canonical(model, state):
    """Copy a canonical state (dict of NumPy arrays) into `model`, bit for bit."""
    state = validate_state(state, model.spec)
    for key, variable in canonical_variables(model).items():
        variable.assign(oihw_to_hwio(state[key]).astype(variable.dtype))


def export_canonical(model):
    return {key: hwio_to_oihw(variable.numpy()) for key, variable in canonical_variables(model).items()}


def to_canonical(model, named_tensors):
    """Per-variable tensors (gradients, momentum buffers) keyed by variable path -> NumPy."""
    return {canonical_key(model, path): hwio_to_oihw(np.asarray(value)) for path, value in named_tensors.items()}


def from_canonical(model, arrays):
    """The inverse of to_canonical, in the model's dtype."""
    paths = {key: variable.path for key, variable in canonical_variables(model).items()}
    return {paths[key]: oihw_to_hwio(value).astype(model.dtype) for key, value in arrays.items()}
