"""The version sets `make compat` tests: one Python and the packages installed into it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VersionSet:
    name: str
    about: str
    python: str  # the interpreter's major.minor
    packages: tuple[str, ...] = ()  # pip requirements, installed together
    no_deps: tuple[str, ...] = ()  # then installed without their dependencies (MXNet declares numpy<2)
    lift_cap: bool = False  # a torch above the machine-wide pip constraint (see DESIGN.md)
    venv: str | None = None  # an existing venv (built elsewhere) instead of one of its own


# The contract every backend keeps, and the framework-free core it rests on: minutes, not the whole suite.
TESTS = ("tests/test_backends.py", "tests/test_specs.py", "tests/test_weights.py")
CHECKS = (("tiny", 19), ("tiny_d2l", 13), ("d2l", 32))  # `densenet-xf check` per backend, float32 and float64
CORE = ("safetensors", "matplotlib", "tqdm", "pillow", "pytest", "hypothesis")
MXNET = ("mxnet==1.9.1", "graphviz==0.8.4")

SETS = {
    "pins": VersionSet(
        "pins",
        "the Makefile's pins, in the project's .venv (make setup)",
        python="3.11",
        venv=".venv",
    ),
    "gpu": VersionSet(
        "gpu",
        "the offline GPU machine's python3 (torch 2.11.0+cu130, jax 0.11.2 with the CUDA 13 plugin, no TensorFlow "
        "or MXNet), as the same versions' wheels from PyPI running on the CPU",
        python="3.12",
        packages=(
            "torch==2.11.0",
            "torchvision==0.26.0",
            "jax==0.11.2",
            "jaxlib==0.11.2",
            "flax==0.12.12",
            "optax==0.2.8",
            "numpy==2.5.2",
            "onnx==1.23.1",
            "onnxruntime==1.30.0",
            "safetensors==0.8.0",
            "matplotlib",
            "tqdm",
            "pillow",
            "pytest",
            "hypothesis",
            "h5py",
        ),
    ),
    "newest": VersionSet(
        "newest",
        "the newest release of every package on the registry on the day the venv was built, all four frameworks",
        python="3.12",
        packages=("torch", "tensorflow-cpu", "jax", "jaxlib", "flax", "optax", "numpy", "onnx", "onnxruntime")
        + CORE
        + ("setuptools",),
        no_deps=MXNET,
        lift_cap=True,
    ),
}
