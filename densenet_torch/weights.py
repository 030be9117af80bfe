"""Canonical weights in and out of a PyTorch DenseNet.

The model's module names are torchvision's, so the canonical keys are its state_dict keys
and the layouts already match: the only work is validation and NumPy conversion.
"""

import torch

from conformance.weights import IGNORED_SUFFIXES, validate_state


def load_canonical(model, state):
    """Copy a canonical state (dict of NumPy arrays) into `model`, bit for bit."""
    state = validate_state(state, model.spec)
    tensors = {key: torch.from_numpy(value) for key, value in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and all(key.endswith(IGNORED_SUFFIXES) for key in missing), (missing, unexpected)


def export_canonical(model):
    return {
        key: value.detach().cpu().numpy().copy()
        for key, value in model.state_dict().items()
        if not key.endswith(IGNORED_SUFFIXES)
    }


def to_canonical(named_tensors):
    """Per-parameter tensors (gradients, momentum buffers) keyed by parameter name -> NumPy."""
    return {key: value.detach().cpu().numpy().copy() for key, value in named_tensors.items()}


def from_canonical(model, arrays):
    """The inverse of to_canonical, onto the model's device."""
    device = next(model.parameters()).device
    return {key: torch.from_numpy(value).to(device) for key, value in arrays.items()}
