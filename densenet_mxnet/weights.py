"""Canonical weights in and out of a Gluon DenseNet.

The model's children carry torchvision's names, so a parameter's structural name is its
canonical key, except that Gluon's BatchNorm calls weight and bias gamma and beta. Conv
weights are OIHW and Dense weights (out, in) in Gluon too: no transposes.
"""

from mxnet import np
from mxnet.util import use_np

from conformance.weights import validate_state

from . import compat  # noqa: F401  (before mxnet)

CANONICAL_NAMES = {"gamma": "weight", "beta": "bias"}  # Gluon BatchNorm -> torchvision


def canonical_key(name):
    module, kind = name.rsplit(".", 1)
    return f"{module}.{CANONICAL_NAMES.get(kind, kind)}"


def structural_params(model):
    """Parameters by structural name ("features.norm0.gamma"), in network order.

    Gluon 1.x's collect_params() keys are global prefixes ("batchnorm3_gamma"); this is the
    method save_parameters uses for the structural names (public as collect_params in 2.x).
    """
    return model._collect_params_with_prefix()


def trainable_params(model):
    return {name: p for name, p in structural_params(model).items() if p.grad_req != "null"}


@use_np
def load_canonical(model, state, ctx=None):
    """Copy a canonical state (dict of NumPy arrays) into `model`, bit for bit, cast to the
    model's dtype. Parameters not yet initialised are initialised on `ctx` (default CPU)."""
    state = validate_state(state, model.spec)
    for name, param in structural_params(model).items():
        # What load_parameters does per parameter: set the data, initialising it if needed.
        # An initialised parameter is loaded onto every context it lives on (data parallelism)
        param._load_init(
            np.array(state[canonical_key(name)]), None if param._data is not None else ctx, cast_dtype=True
        )


@use_np
def export_canonical(model):
    # The first context's copy: with several (data parallelism) data() would pick the current context
    return to_canonical({name: param.data(param.list_ctx()[0]) for name, param in structural_params(model).items()})


@use_np
def to_canonical(named_arrays):
    """Per-parameter arrays (gradients, momentum buffers) keyed by structural name -> NumPy."""
    return {canonical_key(name): value.asnumpy() for name, value in named_arrays.items()}


@use_np
def from_canonical(model, arrays):
    """The inverse of to_canonical, in each parameter's dtype, on the model's context."""
    return {
        name: np.array(arrays[canonical_key(name)], dtype=param.dtype, ctx=param.list_ctx()[0])
        for name, param in structural_params(model).items()
        if canonical_key(name) in arrays
    }
