"""The registry of backends and the interface each one implements.

`conformance` never imports a framework at import time: a backend's module is imported
only when it is asked for, by name. Every backend package has a `backend.py` with a class
`Backend(BackendBase)` that turns framework objects into NumPy arrays and canonical state
dicts, so that everything else (checks, CLI, training loop, report) stays framework-free.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod

import numpy as np

BACKENDS = {
    "torch": "densenet_torch.backend",
    "mxnet": "densenet_mxnet.backend",
    "tf": "densenet_tf.backend",
    "jax": "densenet_jax.backend",
}
REFERENCE = "reference"
DEVICES = ("cpu", "gpu")
# More backends, "name=module,name=module", e.g. a deliberately broken one in the tests.
EXTRA_BACKENDS_ENV = "DENSENET_XF_BACKENDS"


def registered_backends() -> dict[str, str]:
    extra = os.environ.get(EXTRA_BACKENDS_ENV, "")
    pairs = (item.split("=", 1) for item in extra.split(",") if "=" in item)
    return {**BACKENDS, **{name.strip(): module.strip() for name, module in pairs}}


class BackendUnavailable(RuntimeError):
    """The backend's framework is not installed (or cannot be imported here)."""


def backend_names(with_reference: bool = False) -> list[str]:
    return ([REFERENCE] if with_reference else []) + list(registered_backends())


def check_backend_name(name: str, with_reference: bool = True) -> None:
    valid = backend_names(with_reference)
    if name not in valid:
        raise ValueError(f"unknown backend {name!r}; valid names: {', '.join(valid)}")


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; valid: {', '.join(DEVICES)} ('cuda' is accepted for gpu)")


def load_backend(name: str, device: str = "cpu") -> "BackendBase":
    """Import backend `name` and return its adapter; BackendUnavailable if its framework is missing."""
    device = "gpu" if device == "cuda" else device
    check_device(device)
    if name == REFERENCE:
        from .reference_backend import Backend
        return Backend(device)
    check_backend_name(name)
    module_name = registered_backends()[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:  # the framework is missing, or cannot be used here (Keras on another backend)
        if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] == module_name.split(".")[0]:
            raise  # our own package is broken or missing: a bug, not a missing framework
        raise BackendUnavailable(f"backend {name!r} is not available: {error}") from error
    return module.Backend(device)


class Trainer(ABC):
    """A model with its optimiser (SGD with optional momentum), in the framework's idiom."""

    @abstractmethod
    def train_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
        """One optimiser step on a native-layout float32 batch; (mean loss, correct predictions)."""

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Eval-mode logits for a native-layout batch."""

    @abstractmethod
    def export_optimizer_state(self) -> dict[str, np.ndarray]:
        """Momentum buffers in PyTorch's convention (buf = m * buf + g), keyed by canonical name,
        PyTorch layout; {} without momentum. A backend that converts from another convention
        exports float64, so that loading the export restores its own state bit for bit."""

    @abstractmethod
    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what export_optimizer_state returned."""


class BackendBase(ABC):
    """What every backend offers the framework-free code.

    Inputs are native-layout NumPy batches of the model's dtype (`layout` says which); states, gradients
    and optimiser buffers are canonical dicts (torchvision names, PyTorch layout).
    """

    name: str
    layout: str  # "NCHW" or "NHWC"
    running_var: str  # "unbiased" (PyTorch) or "biased" (MXNet, Keras, Flax)
    # MXNet hands the learning rate and the BatchNorm momentum to its kernels as 32-bit
    # floats, even for a float64 model; the float64 checks then expect the step that the
    # rounded values give.
    float32_hyperparameters = False

    def __init__(self, device: str = "cpu"):
        self.requested_device = device
        self.device_note = ""  # why the backend runs elsewhere than asked, if it does

    @property
    @abstractmethod
    def device_name(self) -> str:
        """Where this backend computes, in words ("cpu", "cuda:0 NVIDIA H100 80GB HBM3")."""

    @abstractmethod
    def build(self, spec, dtype: str = "float32") -> object:
        """The framework's model for `spec`, with parameters allocated (no dummy call needed).

        dtype "float64" is for the exact-arithmetic conformance checks; inputs then come in
        float64 and states, gradients and logits go out in float64."""

    @abstractmethod
    def load_state(self, model, state: dict[str, np.ndarray]) -> None:
        """Load a canonical state; CheckpointError on missing, unexpected or mis-shaped keys."""

    @abstractmethod
    def export_state(self, model) -> dict[str, np.ndarray]:
        """The model's canonical state."""

    @abstractmethod
    def count_params(self, model) -> tuple[int, int]:
        """(trainable, non-trainable) parameter counts as the framework reports them."""

    @abstractmethod
    def stage_shapes(self, model, x: np.ndarray) -> dict[str, tuple[int, ...]]:
        """Output shape of every stage (stem, denseblockN, transitionN, logits), native layout."""

    @abstractmethod
    def forward(self, model, x: np.ndarray, train: bool) -> np.ndarray:
        """Logits; in train mode BatchNorm normalises with batch statistics (whether a forward
        pass alone also moves the running statistics differs between frameworks)."""

    @abstractmethod
    def gradients(self, model, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Train-mode mean cross-entropy and the gradient of every trainable parameter (canonical)."""

    @abstractmethod
    def make_trainer(self, model, lr: float, momentum: float = 0.0) -> Trainer:
        """An SGD trainer for `model` (the framework's own optimiser)."""
