"""Canonical weights: one safetensors format for all four backends.

PyTorch layout (conv OIHW, linear (out, in)) and torchvision's key names, float32. A
state is a plain dict of NumPy arrays; `parameter_table(spec)` says which keys and shapes
it must hold. Initial weights are drawn here, in NumPy, from a seed, so every backend starts
from the same point.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .files import atomic_write_bytes
from .specs import DenseNetSpec, SpecError, get_spec, is_running_stat, parameter_table


def oihw_to_hwio(array: np.ndarray) -> np.ndarray:
    """PyTorch's layouts to Keras' and Flax's: conv kernels OIHW -> HWIO, dense kernels
    (out, in) -> (in, out); vectors as they are."""
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    return np.ascontiguousarray(array.T) if array.ndim == 2 else array


def hwio_to_oihw(array: np.ndarray) -> np.ndarray:
    """Keras' and Flax's layouts to PyTorch's (the canonical one): the inverse of oihw_to_hwio."""
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    return np.ascontiguousarray(array.T) if array.ndim == 2 else array


FORMAT = "densenet-xf canonical v1"
# torchvision state dicts carry a BatchNorm batch counter that no other framework has and
# that plays no part at momentum 0.1; it is accepted on load and dropped.
IGNORED_SUFFIXES = (".num_batches_tracked",)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the architecture, or a file that is not a checkpoint."""


def init_state(spec: DenseNetSpec, seed: int = 0, randomize_bn: bool = False) -> dict[str, np.ndarray]:
    """Seeded initial weights in torchvision's scheme.

    Convs: Kaiming normal (fan-in, gain sqrt 2); conv biases and the classifier: PyTorch's
    default uniform(+-1/sqrt(fan_in)), classifier bias 0; BatchNorm weight 1, bias 0, running
    mean 0, running var 1. `randomize_bn` draws BatchNorm parameters and statistics at random
    instead, so that a conformance check can tell gamma from beta and mean from variance.
    """
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in parameter_table(spec).items():
        module, kind = key.rsplit(".", 1)
        is_norm = module.rsplit(".", 1)[-1].startswith("norm")
        if is_norm:
            state[key] = _init_norm(rng, kind, shape, randomize_bn)
        elif key == "classifier.bias":
            state[key] = np.zeros(shape)
        elif kind == "bias":
            fan_in = int(np.prod(state[f"{module}.weight"].shape[1:]))
            state[key] = rng.uniform(-1, 1, shape) / np.sqrt(fan_in)
        elif module == "classifier":
            state[key] = rng.uniform(-1, 1, shape) / np.sqrt(shape[1])
        else:
            fan_in = int(np.prod(shape[1:]))
            state[key] = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    return {key: value.astype(np.float32) for key, value in state.items()}


def _init_norm(rng, kind, shape, randomize):
    if not randomize:
        return np.ones(shape) if kind in ("weight", "running_var") else np.zeros(shape)
    if kind == "weight":
        return rng.uniform(0.5, 1.5, shape)
    if kind == "running_var":
        return rng.uniform(0.5, 2.0, shape)
    return rng.uniform(-0.5, 0.5, shape)


def validate_state(state: dict, spec: DenseNetSpec, *, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Return the state's canonical entries; raise CheckpointError naming every missing,
    unexpected and mis-shaped key."""
    table = parameter_table(spec)
    present = {key: value for key, value in state.items() if not key.endswith(IGNORED_SUFFIXES)}
    missing = [key for key in table if key not in present]
    unexpected = [key for key in present if key not in table]
    misshaped = [
        f"{key}: expected {table[key]}, got {tuple(np.shape(present[key]))}"
        for key in table
        if key in present and tuple(np.shape(present[key])) != table[key]
    ]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{len(items)} {title} key(s): {shown}")
    if problems:
        raise CheckpointError(f"{source} does not fit {spec.name}: " + "; ".join(problems))
    return {key: np.asarray(present[key]) for key in table}


def trainable_keys(spec: DenseNetSpec) -> list[str]:
    return [key for key in parameter_table(spec) if not is_running_stat(key)]


def save_state(
    path: str | os.PathLike,
    state: dict[str, np.ndarray],
    spec: DenseNetSpec,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Validate and write a canonical checkpoint atomically, with the spec in its metadata."""
    from safetensors.numpy import save

    state = validate_state(state, spec, source="state to save")
    metadata = {"format": FORMAT, "arch": spec.name, "spec": spec.to_json(), **(extra_metadata or {})}
    tensors = {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in state.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error


# A spec read from a file is checked before anything is built from it: the fields and their
# types, and bounds far above any published DenseNet (densenet264 has 134 dense layers and
# 2,688 channels at its widest, BC-250 123 layers), so that a small file claiming millions of
# layers is refused at once instead of building a table of millions of keys.
MAX_BLOCKS = 16
MAX_LAYERS = 2048  # dense layers in all blocks together
MAX_WIDTH = 1 << 17  # channels of any layer, classes, input channels
SPEC_FIELDS = {  # field -> (the types it may have, in words)
    "name": ((str,), "a string"),
    "stem": ((str,), "a string"),
    "num_init_features": ((int,), "an integer"),
    "growth_rate": ((int,), "an integer"),
    "block_config": ((list, tuple), "a list of integers"),
    "bn_size": ((int, type(None)), "an integer or null"),
    "compression": ((int, float), "a number"),
    "conv_bias": ((bool,), "true or false"),
    "in_channels": ((int,), "an integer"),
    "num_classes": ((int,), "an integer"),
    "drop_rate": ((int, float), "a number"),
}
OPTIONAL_SPEC_FIELDS = ("drop_rate",)


def spec_from_metadata(text, source="checkpoint") -> DenseNetSpec:
    """A spec from a file's JSON metadata, validated: every field present with its type, and the
    sizes within bounds, before anything is built from it."""

    def refuse(problem):
        return CheckpointError(f"{source}: its metadata's spec {problem}")

    try:
        fields = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise refuse(f"is not JSON ({error})") from None
    if not isinstance(fields, dict):
        raise refuse(f"is a JSON {type(fields).__name__}, not an object of fields")
    missing = [name for name in SPEC_FIELDS if name not in fields and name not in OPTIONAL_SPEC_FIELDS]
    unknown = [str(name) for name in fields if name not in SPEC_FIELDS]
    if missing or unknown:
        raise refuse(
            "; ".join(
                f"{title} field(s): {', '.join(names)}"
                for title, names in (("lacks the", missing), ("has unknown", unknown))
                if names
            )
        )
    for name, value in fields.items():
        kinds, words = SPEC_FIELDS[name]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise refuse(f"field {name} is {value!r:.40}, not {words}")
    blocks = fields["block_config"]
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in blocks):
        raise refuse(f"field block_config is {blocks!r:.40}, not a list of integers")
    if len(blocks) > MAX_BLOCKS or sum(blocks) > MAX_LAYERS:
        raise refuse(
            f"claims {len(blocks)} blocks of {sum(blocks)} layers in all; "
            f"at most {MAX_BLOCKS} blocks and {MAX_LAYERS} layers are read"
        )
    widths = {
        name: fields[name] for name in ("num_init_features", "growth_rate", "in_channels", "num_classes", "bn_size")
    }
    for name, width in widths.items():
        if width is not None and width > MAX_WIDTH:
            raise refuse(f"field {name} is {width}; at most {MAX_WIDTH} is read")
    widest = fields["num_init_features"] + sum(blocks) * fields["growth_rate"]
    if widest > MAX_WIDTH:
        raise refuse(f"describes a net {widest} channels wide; at most {MAX_WIDTH} is read")
    try:
        return DenseNetSpec(**{**fields, "block_config": tuple(blocks)})
    except SpecError as error:
        raise refuse(f"is not a valid DenseNet: {error}") from None


def spec_of_checkpoint(path: str | os.PathLike, metadata: dict | None = None) -> DenseNetSpec:
    metadata = read_metadata(path) if metadata is None else metadata
    if "spec" in metadata:
        return spec_from_metadata(metadata["spec"], str(path))
    if "arch" in metadata:
        try:
            return get_spec(metadata["arch"])
        except SpecError as error:
            raise CheckpointError(f"{path}: its metadata names {error}") from None
    raise CheckpointError(f"{path} names no architecture in its metadata; pass --arch")


def load_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, as NumPy arrays (no validation)."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error


def load_state(path: str | os.PathLike, spec: DenseNetSpec | None = None) -> dict[str, np.ndarray]:
    """Read and validate a canonical checkpoint (float32 arrays). `spec` defaults to the
    architecture recorded in the file."""
    spec = spec or spec_of_checkpoint(path)  # first: a file that claims an absurd net is refused unread
    state = validate_state(load_tensors(path), spec, source=str(path))
    return {key: value.astype(np.float32, copy=False) for key, value in state.items()}


def save_arrays(path, arrays: dict, metadata: dict) -> None:
    """Any arrays (optimiser state) in a safetensors file, atomically, keeping their dtypes."""
    from safetensors.numpy import save

    tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}  # float64 stays float64
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_arrays(path) -> dict:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
