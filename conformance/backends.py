"""The registry of backends: which module implements each one, and loading it by name.

`conformance` never imports a framework at import time: a backend's module is imported
only when it is asked for, by name (`load_backend`). The interface the modules implement
is `conformance.interface`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from . import reference_backend
from .interface import BackendBase, BackendUnavailable, check_device


@dataclass(frozen=True)
class Framework:
    """One backend's package and the names its framework goes by."""

    package: str  # the backend's package: densenet_torch, ...
    title: str  # the framework's short name (site tabs, reports)
    full_title: str  # with the API used (side-by-side headings)
    module: str  # the module whose absence means the framework is not installed


FRAMEWORKS = {
    "torch": Framework("densenet_torch", "PyTorch", "PyTorch", "torch"),
    "mxnet": Framework("densenet_mxnet", "MXNet", "MXNet Gluon", "mxnet"),
    "tf": Framework("densenet_tf", "TensorFlow", "TensorFlow / Keras 3", "tensorflow"),
    "jax": Framework("densenet_jax", "JAX", "JAX / Flax", "flax"),
}
BACKENDS = {name: f"{framework.package}.backend" for name, framework in FRAMEWORKS.items()}
REFERENCE = "reference"
# More backends, "name=module,name=module", e.g. a deliberately broken one in the tests.
EXTRA_BACKENDS_ENV = "DENSENET_XF_BACKENDS"


def registered_backends() -> dict[str, str]:
    extra = os.environ.get(EXTRA_BACKENDS_ENV, "")
    pairs = (item.split("=", 1) for item in extra.split(",") if "=" in item)
    return {**BACKENDS, **{name.strip(): module.strip() for name, module in pairs}}


def backend_names(with_reference: bool = False) -> list[str]:
    return ([REFERENCE] if with_reference else []) + list(registered_backends())


def check_backend_name(name: str, with_reference: bool = True) -> None:
    valid = backend_names(with_reference)
    if name not in valid:
        raise ValueError(f"unknown backend {name!r}; valid names: {', '.join(valid)}")


def package_of(name: str) -> str:
    """The package that implements backend `name` (densenet_torch, ...)."""
    check_backend_name(name, with_reference=False)
    return registered_backends()[name].rsplit(".", 1)[0]


def _import(name: str, module_name: str):
    """Import one of backend `name`'s modules; BackendUnavailable if its framework is missing."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:  # the framework is missing, or cannot be used here (Keras on another backend)
        if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] == module_name.split(".")[0]:
            raise  # our own package is broken or missing: a bug, not a missing framework
        raise BackendUnavailable(f"backend {name!r} is not available: {error}") from error


def lacks_module(name: str, module: str) -> bool:
    """Whether backend `name`'s package is known, without importing its framework, to have no
    `module`.py (a backend that is a single module cannot be told without importing it)."""
    found = importlib.util.find_spec(package_of(name))
    folders = (found.submodule_search_locations or ()) if found else ()
    return bool(folders) and not any((Path(folder) / f"{module}.py").is_file() for folder in folders)


def backend_module(name: str, module: str):
    """Module `module` beside backend `name`'s backend.py (its zoo, export or distributed module)."""
    return _import(name, f"{package_of(name)}.{module}")


def load_backend(name: str, device: str = "cpu") -> BackendBase:
    """Import backend `name` and return its adapter; BackendUnavailable if its framework is missing."""
    device = "gpu" if device == "cuda" else device
    check_device(device)
    if name == REFERENCE:
        return reference_backend.Backend(device)
    check_backend_name(name)
    return _import(name, registered_backends()[name]).Backend(device)
