"""Canonical weights in and out of Flax variables.

A variable's path spells its canonical key: ('params', 'denseblock1', 'denselayer1',
'norm1', 'scale') is 'features.denseblock1.denselayer1.norm1.weight'. Only the leaf names
and the layouts differ: Flax convolution kernels are HWIO and dense kernels (in, out),
PyTorch's OIHW and (out, in). Transposes are exact, so the round trip is bit for bit.
"""

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from conformance.specs import get_spec
from conformance.weights import hwio_to_oihw, oihw_to_hwio, validate_state

from .model import DenseNet, variable_shapes

# Canonical leaf name -> (Flax collection, leaf name), for a BatchNorm and for a Conv or Dense.
NORM_LEAVES = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
LAYER_LEAVES = {"weight": ("params", "kernel"), "bias": ("params", "bias")}


def canonical_key(path):
    """A Flax variable path (collection, *modules, leaf) as a canonical key."""
    collection, *modules, leaf = path
    leaves = NORM_LEAVES if modules[-1].startswith("norm") else LAYER_LEAVES
    name = next(name for name, flax_name in leaves.items() if flax_name == (collection, leaf))
    prefix = "" if modules[0] == "classifier" else "features."
    return prefix + ".".join((*modules, name))


def load_canonical(module, state):
    """Flax variables {'params', 'batch_stats'} for `module` from a canonical state, bit for bit."""
    state = validate_state(state, get_spec(module.spec))
    # Shapes come from tracing the module, so a variable the state does not name is a KeyError.
    # They are the spec's: one trace serves every dtype and the memory-efficient model.
    shapes = variable_shapes(DenseNet(module.spec))
    return {collection: from_canonical(state, tree, collection, module.dtype) for collection, tree in shapes.items()}


def export_canonical(variables):
    return {
        key: value for collection, tree in variables.items() for key, value in to_canonical(tree, collection).items()
    }


def to_canonical(tree, collection="params"):
    """A tree shaped like one collection (gradients, momentum buffers, batch_stats) -> NumPy dict."""
    return {
        canonical_key((collection, *path)): np.array(hwio_to_oihw(np.asarray(value)), order="C")
        for path, value in flatten_dict(tree).items()
    }


def from_canonical(arrays, like, collection="params", dtype=None):
    """The inverse of to_canonical: a tree shaped like `like`, in `dtype` (or like's dtypes)."""

    def leaf(path, old):  # cast by NumPy: jnp.asarray would compile a cast on the device for every shape
        return np.asarray(oihw_to_hwio(arrays[canonical_key((collection, *path))]), dtype or old.dtype)

    return jax.device_put(unflatten_dict({path: leaf(path, old) for path, old in flatten_dict(like).items()}))
