"""Zoo-style constructors for Flax. JAX has no model zoo (and so no zoo file format) of its own:
this module holds only the constructors, which read any format `densenet-xf convert` reads
(torchvision, Keras applications, Gluon, canonical) through `conformance.zoo`."""

import jax.numpy as jnp

from conformance import zoo
from conformance.weights import init_state

from .model import DenseNet
from .weights import load_canonical


def preprocess_input(images):
    """uint8 or [0, 255] float NHWC RGB images, normalised like torchvision (Keras' 'torch' mode)."""
    return (jnp.asarray(images, jnp.float32) / 255.0 - jnp.array(zoo.IMAGENET_MEAN)) / jnp.array(zoo.IMAGENET_STD)


def _densenet(name, weights=None, num_classes=1000, seed=0, memory_efficient=False):
    """(module, variables): the module is stateless, `variables` holds 'params' and 'batch_stats'.
    memory_efficient (torchvision's option) recomputes concatenations and BN-ReLUs in the backward pass."""
    spec, state = zoo.weights_for(name, weights, num_classes)
    module = DenseNet(spec, memory_efficient=memory_efficient)
    # Random weights are the canonical NumPy draw (torchvision's scheme), as in every backend here.
    return module, load_canonical(module, init_state(spec, seed) if state is None else state)


def DenseNet121(weights=None, num_classes=1000, seed=0, memory_efficient=False):
    """DenseNet-121 as (module, variables); `weights` is None (random, from `seed`) or a path."""
    return _densenet("densenet121", weights, num_classes, seed, memory_efficient)


def DenseNet161(weights=None, num_classes=1000, seed=0, memory_efficient=False):
    return _densenet("densenet161", weights, num_classes, seed, memory_efficient)


def DenseNet169(weights=None, num_classes=1000, seed=0, memory_efficient=False):
    return _densenet("densenet169", weights, num_classes, seed, memory_efficient)


def DenseNet201(weights=None, num_classes=1000, seed=0, memory_efficient=False):
    return _densenet("densenet201", weights, num_classes, seed, memory_efficient)


def DenseNet264(weights=None, num_classes=1000, seed=0, memory_efficient=False):
    return _densenet("densenet264", weights, num_classes, seed, memory_efficient)
