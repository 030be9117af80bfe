"""Model-zoo interop without a framework: formats, key names, layouts, architecture inference.

Three model zoos publish DenseNet weights, each in its own names and layouts:

- torchvision (`.pth`): the canonical keys themselves, or, in the files torchvision still
  publishes, the pre-2018 layout `...denselayer1.norm.1.weight` for `...denselayer1.norm1.weight`;
- Keras applications (`.h5` legacy, `.weights.h5` Keras 3): one layer per name
  (`conv2_block1_1_conv`, `pool2_bn`, `predictions`), HWIO conv kernels, (in, out) dense kernels;
- the MXNet Gluon model zoo (`.params`): structural names (`features.4.0.1.2.weight`), OIHW.

This module renames and transposes between those and the canonical state (NumPy only), infers
the `DenseNetSpec` from the tensors, and dispatches reading and writing to the backend that owns
each format (imported only then). `docs/zoo.md` lists every difference between the zoos' networks
and ours, and how each is handled.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from pathlib import Path

import numpy as np

from .backends import backend_module
from .interface import BackendUnavailable
from .specs import ARCHS, DenseNetSpec, SpecError, get_spec, parameter_table
from .weights import (
    IGNORED_SUFFIXES,
    MAX_BLOCKS,
    MAX_LAYERS,
    CheckpointError,
    hwio_to_oihw,
    load_state,
    load_tensors,
    oihw_to_hwio,
    read_metadata,
    save_state,
    spec_of_checkpoint,
    validate_state,
)

# ImageNet preprocessing of torchvision and of Keras' `preprocess_input(mode="torch")`:
# scale to [0, 1], then subtract the mean and divide by the standard deviation, per RGB channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Keras applications' BatchNormalization epsilon; ours (and torchvision's, Gluon's) is 1e-5.
# Conversion folds the difference into the running variance, exactly:
# (x - m) / sqrt(v + 1.001e-5) == (x - m) / sqrt((v + 1e-8) + 1e-5).
KERAS_BN_EPS = 1.001e-5
CANONICAL_BN_EPS = 1e-5
KERAS_EPS_SHIFT = KERAS_BN_EPS - CANONICAL_BN_EPS

FORMATS = {
    "canonical": "densenet-xf canonical safetensors",
    "torchvision": "torchvision state dict (torch.save)",
    "keras-h5": "Keras applications legacy HDF5 weights",
    "keras": "Keras 3 .weights.h5",
    "keras-model": "Keras 3 .keras model file (its weights are read; its config is not run)",
    "gluon": "MXNet Gluon model-zoo .params",
}

OWNERS = {  # format -> the backend whose framework reads and writes it
    "torchvision": "torch",
    "keras-h5": "tf",
    "keras": "tf",
    "keras-model": "tf",
    "gluon": "mxnet",
}

# The constructors every backend offers, by zoo name.
ZOO_ARCHS = ("densenet121", "densenet161", "densenet169", "densenet201", "densenet264")


class ZooError(CheckpointError):
    """A model-zoo file that cannot be read or written as asked; the message names the file."""


_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def reason(error: BaseException) -> str:
    """A framework's error as one line of plain text: its type and first non-empty line, without
    terminal escape codes (MXNet colours its messages)."""
    lines = [line.strip() for line in _ESCAPES.sub("", str(error)).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Traceback", "Stack trace", "File ", "[bt]"))] or lines
    line = lines[0].removeprefix(f"{type(error).__name__}: ") if lines else "no message"
    return f"{type(error).__name__}: {line}"


def detect_format(path, override: str | None = None) -> str:
    """The format of `path` from its suffix (`override`, a FORMATS name, wins)."""
    if override is not None:
        if override not in FORMATS:
            raise ZooError(f"unknown format {override!r} for {path}; valid: {', '.join(FORMATS)}")
        return override
    name = Path(path).name.lower()
    for suffix, fmt in (
        (".safetensors", "canonical"),
        (".pth", "torchvision"),
        (".pt", "torchvision"),
        (".pth.tar", "torchvision"),  # timm's and the ImageNet example's training checkpoints
        (".bin", "torchvision"),  # Hugging Face's pytorch_model.bin
        (".weights.h5", "keras"),
        (".keras", "keras-model"),
        (".h5", "keras-h5"),
        (".hdf5", "keras-h5"),
        (".params", "gluon"),
    ):
        if name.endswith(suffix):
            return fmt
    raise ZooError(
        f"cannot tell the format of {path} from its name; expected .safetensors, .pth/.pt/.pth.tar/.bin, "
        f".h5 (Keras applications), .weights.h5 or .keras (Keras 3) or .params (Gluon), or pass --from/--to"
    )


# ---------------------------------------------------------------------------------------
# Architecture inference


def _layer_counts(keys, source) -> list[int]:
    """Dense layers per block, from the highest layer number any key of each block names."""
    layers: dict[int, int] = {}
    for key in keys:
        if m := re.match(r"features\.denseblock(\d+)\.denselayer(\d+)\.", key):
            block, layer = int(m.group(1)), int(m.group(2))
            layers[block] = max(layers.get(block, 0), layer)
    if max(layers, default=0) > MAX_BLOCKS or sum(layers.values()) > MAX_LAYERS:
        raise ZooError(
            f"{source} names dense block {max(layers)} and {sum(layers.values())} dense layers; "
            f"at most {MAX_BLOCKS} blocks and {MAX_LAYERS} layers are read"
        )
    return [layers.get(b, 0) for b in range(1, max(layers, default=0) + 1)]


# The stems other DenseNet code builds, recognised by their keys, so that a file with one is
# refused in words instead of as a list of mis-shaped tensors.
OUR_STEMS = (
    "densenet-xf builds the DenseNet-BC stems only: one 7x7/2 convolution, BatchNorm and a 3x3/2 "
    "max-pool (imagenet), or one 3x3 convolution (cifar)"
)


def check_stem(state: dict, source) -> None:
    """Refuse, in words, a stem that is neither of ours (timm's deep stem, for one)."""
    convs = [key for key in ("features.conv0.weight", "features.conv1.weight", "features.conv2.weight") if key in state]
    if len(convs) > 1:
        kernels = ", ".join("x".join(map(str, np.shape(state[key])[2:])) for key in convs)
        raise ZooError(
            f"{source} has a deep stem: {len(convs)} convolutions ({kernels}) before the first dense block, "
            f"as timm's deep-stem DenseNets (densenet264d and the like) build; {OUR_STEMS}"
        )
    kernel = np.shape(state["features.conv0.weight"])[2:] if convs else ()
    expected = (7, 7) if "features.norm0.weight" in state else (3, 3)
    if convs and tuple(kernel) != expected:
        raise ZooError(
            f"{source}'s stem is a {'x'.join(map(str, kernel))} convolution"
            f"{' with BatchNorm' if expected == (7, 7) else ''}; {OUR_STEMS}"
        )


def infer_spec(state: dict, source: str = "state") -> DenseNetSpec:
    """The architecture of a canonical state, from its keys and shapes; a known name when one fits."""
    if "features.conv0.weight" not in state:
        first = ", ".join(list(state)[:3])
        raise ZooError(
            f"{source} is not a DenseNet state: it has no features.conv0.weight "
            f"(its {len(state)} keys begin {first or 'with nothing'})"
        )
    check_stem(state, source)
    try:
        conv0 = np.shape(state["features.conv0.weight"])
        blocks = _layer_counts(state, source)
        layer = "features.denseblock1.denselayer1"
        bottleneck = f"{layer}.conv2.weight" in state
        growth = np.shape(state[f"{layer}.conv2.weight" if bottleneck else f"{layer}.conv1.weight"])[0]
        bn_size = np.shape(state[f"{layer}.conv1.weight"])[0] // growth if bottleneck else None
        if len(blocks) > 1:
            out, inp = np.shape(state["features.transition1.conv.weight"])[:2]
            compression = out / inp
        else:
            compression = 0.5
        classes = np.shape(state["classifier.weight"])[0]
        spec = DenseNetSpec(
            "custom",
            "imagenet" if "features.norm0.weight" in state else "cifar",
            conv0[0],
            growth,
            tuple(blocks),
            bn_size,
            compression,
            "features.conv0.bias" in state,
            conv0[1],
            classes,
        )
    except KeyError as error:
        raise ZooError(f"{source} is not a DenseNet state: no {error} to infer the architecture from") from None
    except (IndexError, ValueError, ZeroDivisionError) as error:  # shapes that no DenseNet has
        raise ZooError(f"{source} does not describe a DenseNet: {error}") from None
    validate_state(state, spec, source=source)  # the rest of the tensors must fit what was inferred
    return _named(spec)


def _named(spec: DenseNetSpec) -> DenseNetSpec:
    for name, known in ARCHS.items():
        if known.replace(name="custom", drop_rate=0.0) == spec.replace(name="custom", drop_rate=0.0):
            return spec.replace(name=name)
    return spec.replace(name=f"densenet-k{spec.growth_rate}-{'-'.join(map(str, spec.block_config))}")


def spec_differences(spec: DenseNetSpec, expected: DenseNetSpec) -> list[str]:
    """The fields (the name aside) in which `spec` differs from `expected`, in the spec's order."""
    return [
        field
        for field in DenseNetSpec.__dataclass_fields__
        if field != "name" and getattr(spec, field) != getattr(expected, field)
    ]


def check_arch(spec: DenseNetSpec, arch, source) -> DenseNetSpec:
    """`arch` (a name or spec) must describe the inferred `spec`; only the names may differ.
    The error names the first field that differs."""
    if arch is None:
        return spec
    expected = get_spec(arch)
    differences = spec_differences(spec, expected)
    if differences:
        field = differences[0]
        more = f" (and {len(differences) - 1} more field(s): {', '.join(differences[1:])})" if differences[1:] else ""
        raise ZooError(
            f"{source} is not {expected.name}: its {field} is {getattr(spec, field)!r}, "
            f"{expected.name}'s is {getattr(expected, field)!r}{more}; without --arch it converts as "
            f"{spec.name}"
        )
    return expected


# ---------------------------------------------------------------------------------------
# Checkpoints as training scripts save them: a state dict under an entry, keys with a prefix

# Entries of a training checkpoint that hold the model's state dict, in the order looked at:
# torchvision's and timm's training scripts save "state_dict" (timm also "state_dict_ema",
# its EMA of the weights), others "model".
STATE_ENTRIES = ("state_dict", "model", "state_dict_ema")
# Prefixes wrappers put before every key: DistributedDataParallel and DataParallel, torch.compile.
WRAPPER_PREFIXES = {"module.": "DistributedDataParallel", "_orig_mod.": "torch.compile"}


def _is_state(obj) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(key, str) and isinstance(value, np.ndarray) for key, value in obj.items())
    )


def strip_prefixes(state: dict) -> tuple[dict, list[str]]:
    """The state with the wrappers' prefixes that every key carries removed; the prefixes removed."""
    stripped = []
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(key.startswith(p) for key in state)), None)
        if prefix is None:
            break
        state = {key[len(prefix) :]: value for key, value in state.items()}
        stripped.append(prefix)
    return state, stripped


def from_checkpoint(obj, source) -> tuple[dict, list[str]]:
    """A state dict, or a training checkpoint holding one, as canonical keys; and what was done
    to find it, in words."""
    notes = []
    if not isinstance(obj, dict):
        raise ZooError(f"{source} holds a {type(obj).__name__}, not a state dict of tensors")
    if not _is_state(obj):
        found = [entry for entry in STATE_ENTRIES if _is_state(obj.get(entry))]
        if not found:
            entries = ", ".join(map(str, list(obj)[:8])) or "nothing"
            raise ZooError(
                f"{source} holds a dict ({entries}) that is neither a state dict of tensors nor a "
                f"training checkpoint with one under {', '.join(STATE_ENTRIES)}"
            )
        obj = obj[found[0]]
        also = f" (also there: {', '.join(found[1:])})" if found[1:] else ""
        notes.append(f"the state dict is the checkpoint's {found[0]!r} entry{also}")
    state, stripped = strip_prefixes(obj)
    notes += [f"every key's {prefix!r} prefix ({WRAPPER_PREFIXES[prefix]}) removed" for prefix in stripped]
    return from_torchvision(state), notes


# ---------------------------------------------------------------------------------------
# torchvision: today's keys are the canonical ones; the pre-2018 files say norm.1 for norm1

_TORCHVISION_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def from_torchvision(state: dict) -> dict:
    """torchvision's key layouts (both) -> canonical keys; `num_batches_tracked` dropped.
    The regex is the one torchvision's `densenet._load_state_dict` uses."""
    out = {}
    for key, value in state.items():
        match = _TORCHVISION_LEGACY.match(key)
        key = match.group(1) + match.group(2) if match else key
        if not key.endswith(IGNORED_SUFFIXES):
            out[key] = np.asarray(value)
    return out


def to_torchvision(state: dict, legacy: bool = False) -> dict:
    """Canonical -> torchvision keys: today's (what `load_state_dict` takes) or the pre-2018 layout."""
    if not legacy:
        return dict(state)
    return {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key): value for key, value in state.items()}


# ---------------------------------------------------------------------------------------
# Keras applications: layer names, weight lists, HWIO/(in, out) layouts

KERAS_CONV_ORDER = ("weight",)  # Keras applications' convs have no bias
KERAS_NORM_ORDER = ("weight", "bias", "running_mean", "running_var")  # gamma, beta, moving_mean, moving_variance
KERAS_DENSE_ORDER = ("weight", "bias")


def keras_layer_name(module: str) -> str:
    """A canonical module ("features.denseblock1.denselayer2.conv1") as a Keras applications layer name."""
    if module == "classifier":
        return "predictions"
    parts = module.split(".")[1:]
    if parts == ["conv0"]:
        return "conv1_conv"
    if parts == ["norm0"]:
        return "conv1_bn"
    if parts == ["norm5"]:
        return "bn"
    if parts[0].startswith("transition"):
        return f"pool{int(parts[0][10:]) + 1}_{'bn' if parts[1] == 'norm' else 'conv'}"
    block, layer, leaf = int(parts[0][10:]), int(parts[1][10:]), parts[2]
    suffix = {"norm1": "0_bn", "conv1": "1_conv", "norm2": "1_bn", "conv2": "2_conv"}[leaf]
    return f"conv{block + 1}_block{layer}_{suffix}"


def keras_block_config(layer_names) -> tuple[int, ...]:
    """The block config from Keras applications layer names (`conv2_block6_0_bn`, ...)."""
    counts = Counter(int(m.group(1)) for name in layer_names if (m := re.fullmatch(r"conv(\d+)_block\d+_0_bn", name)))
    return tuple(counts[stage] for stage in range(2, len(counts) + 2))


def keras_spec(block_config, classes: int) -> DenseNetSpec:
    """What Keras applications' `DenseNet(blocks)` builds: k=32, 64 init features, 4k bottleneck."""
    return _named(
        DenseNetSpec(
            "custom",
            "imagenet",
            64,
            32,
            tuple(block_config),
            bn_size=4,
            compression=0.5,
            conv_bias=False,
            in_channels=3,
            num_classes=classes,
        )
    )


def _modules(spec: DenseNetSpec) -> dict[str, list[str]]:
    modules: dict[str, list[str]] = {}
    for key in parameter_table(spec):
        module, leaf = key.rsplit(".", 1)
        modules.setdefault(module, []).append(leaf)
    return modules


def keras_layer_shapes(spec: DenseNetSpec) -> list[tuple[str, list[tuple[int, ...]]]]:
    """Keras applications' layers with weights, in its model's order: (Keras 3 name, weight shapes)."""
    table = parameter_table(spec)
    return [
        (keras_layer_name(module), [_hwio_shape(table[f"{module}.{leaf}"]) for leaf in leaves])
        for module, leaves in _modules(spec).items()
    ]


def _hwio_shape(shape):
    return (*shape[2:], shape[1], shape[0]) if len(shape) == 4 else tuple(reversed(shape))


def keras_spec_from_layers(layers, source) -> DenseNetSpec:
    """The spec of Keras applications' DenseNet from its layers' weight shapes in order, whatever
    the layers are called: a 7x7 stem conv and BN, then per dense layer BN, 1x1 conv, BN, 3x3 conv,
    per transition BN and 1x1 conv, then BN and the dense classifier."""
    shapes = [[tuple(shape) for shape in weights] for _, weights in layers]

    def kernel(i, size):
        return i < len(shapes) and len(shapes[i]) == 1 and len(shapes[i][0]) == 4 and shapes[i][0][:2] == (size, size)

    if not (kernel(0, 7) and len(shapes) > 2):
        first = f"{layers[0][0]} holds {shapes[0]}" if layers else "it has no layers with weights"
        raise ZooError(
            f"{source} is not a Keras applications DenseNet: its first layer should be the 7x7 stem conv; {first}"
        )
    blocks, layer, i = [], 0, 2
    while i + 1 < len(shapes) and len(shapes[i]) == 4 and len(blocks) <= MAX_BLOCKS:  # a BatchNorm, then a conv
        if kernel(i + 1, 1) and kernel(i + 3, 3):
            layer, i = layer + 1, i + 4
        elif kernel(i + 1, 1):
            blocks, layer, i = blocks + [layer], 0, i + 2
        else:
            break
    if layer:
        blocks.append(layer)
    classes = shapes[-1][0][-1] if shapes[-1] and len(shapes[-1][0]) == 2 else None
    if classes is None or not blocks or min(blocks) < 1 or len(blocks) > MAX_BLOCKS:
        raise ZooError(
            f"{source} is not a Keras applications DenseNet with its classifier: its {len(layers)} layers with "
            f"weights (the last, {layers[-1][0]}, holding {shapes[-1]}) do not follow the builder's order of "
            f"stem, dense layers, transitions, BN and classifier"
        )
    return keras_spec(blocks, classes)


def check_keras_layers(layers, spec: DenseNetSpec, source) -> None:
    """The file's layers, in order, must hold the shapes of Keras applications' `spec`; the error
    names the first that does not."""
    expected = keras_layer_shapes(spec)
    for index, ((name, shapes), (keras_name, keras_shapes)) in enumerate(zip(layers, expected), start=1):
        if [tuple(shape) for shape in shapes] != keras_shapes:
            raise ZooError(
                f"{source}: layer {index} with weights, {name}, holds {[tuple(s) for s in shapes]}, where Keras "
                f"applications' {spec.name} has {keras_name} with {keras_shapes}"
            )
    if len(layers) != len(expected):
        raise ZooError(
            f"{source} has {len(layers)} layers with weights; Keras applications' {spec.name} has {len(expected)}"
        )


def to_keras(state: dict, spec: DenseNetSpec) -> dict[str, list[np.ndarray]]:
    """Canonical state -> {Keras layer name: its weights in Keras order and layout}, eps folded."""
    state = validate_state(state, spec)
    layers = {}
    for module, leaves in _modules(spec).items():
        arrays = [oihw_to_hwio(state[f"{module}.{leaf}"]) for leaf in leaves]
        if "running_var" in leaves:  # ours divides by sqrt(v + 1e-5), Keras by sqrt(v + 1.001e-5)
            arrays[3] = (arrays[3].astype(np.float64) - KERAS_EPS_SHIFT).astype(arrays[3].dtype)
        layers[keras_layer_name(module)] = arrays
    return layers


def from_keras(layers: dict, spec: DenseNetSpec, source: str = "Keras weights") -> dict[str, np.ndarray]:
    """{Keras layer name: weights} -> canonical state, eps folded into the running variance."""
    state = {}
    for module, leaves in _modules(spec).items():
        name = keras_layer_name(module)
        arrays = layers.get(name)
        if arrays is None or len(arrays) != len(leaves):
            raise ZooError(
                f"{source}: layer {name} ({module}) should hold {len(leaves)} weights, "
                f"got {'none' if arrays is None else len(arrays)}"
            )
        for leaf, array in zip(leaves, arrays):
            array = np.asarray(array)
            if leaf == "running_var":
                array = (array.astype(np.float64) + KERAS_EPS_SHIFT).astype(array.dtype)
            state[f"{module}.{leaf}"] = hwio_to_oihw(array)
    return validate_state(state, spec, source=source)


# ---------------------------------------------------------------------------------------
# Gluon model zoo: structural names of `mxnet.gluon.model_zoo.vision.densenet.DenseNet`
#
# features: 0 conv0, 1 norm0, 2 relu, 3 max-pool, then per block its dense block (layer i is
# a HybridConcurrent whose child 1 is BN, ReLU, Conv1x1, BN, ReLU, Conv3x3) and a transition
# (BN, ReLU, Conv, AvgPool), then norm5, ReLU, AvgPool2D(7), Flatten; `output` is the classifier.

_GLUON_LAYER_MODULES = {"0": "norm1", "2": "conv1", "3": "norm2", "5": "conv2"}


def _gluon_modules(spec: DenseNetSpec) -> dict[str, str]:
    """Canonical module -> Gluon structural prefix."""
    modules = {"features.conv0": "features.0", "features.norm0": "features.1", "classifier": "output"}
    index = 4
    for b, layers in enumerate(spec.block_config, start=1):
        for i in range(1, layers + 1):
            for leaf_index, leaf in _GLUON_LAYER_MODULES.items():
                modules[f"features.denseblock{b}.denselayer{i}.{leaf}"] = f"features.{index}.{i - 1}.1.{leaf_index}"
        index += 1
        if b < len(spec.block_config):
            modules[f"features.transition{b}.norm"] = f"features.{index}.0"
            modules[f"features.transition{b}.conv"] = f"features.{index}.2"
            index += 1
    modules["features.norm5"] = f"features.{index}"
    return modules


def gluon_spec(names_shapes: dict, source: str = "Gluon parameters") -> DenseNetSpec:
    """The architecture from Gluon structural names and shapes (bottleneck, no bias, like its zoo)."""
    try:
        init, in_channels = names_shapes["features.0.weight"][:2]
        classes = names_shapes["output.weight"][0]
        blocks, index = [], 4
        while f"features.{index}.0.1.0.gamma" in names_shapes:
            blocks.append(
                len(
                    {
                        m.group(1)
                        for name in names_shapes
                        if (m := re.match(rf"features\.{index}\.(\d+)\.1\.0\.gamma$", name))
                    }
                )
            )
            index += 2
        growth, width = names_shapes["features.4.0.1.5.weight"][:2]
    except (KeyError, ValueError) as error:
        raise ZooError(f"{source} is not a Gluon model-zoo DenseNet: missing parameter {error}") from None
    return _named(
        DenseNetSpec(
            "custom", "imagenet", init, growth, tuple(blocks), width // growth, 0.5, False, in_channels, classes
        )
    )


def gluon_names(spec: DenseNetSpec) -> dict[str, str]:
    """Canonical key -> Gluon model-zoo structural name (BatchNorm weight/bias are gamma/beta)."""
    prefixes = _gluon_modules(spec)
    names = {}
    for key in parameter_table(spec):
        module, leaf = key.rsplit(".", 1)
        if module.rsplit(".", 1)[-1].startswith("norm"):
            leaf = {"weight": "gamma", "bias": "beta"}.get(leaf, leaf)
        names[key] = f"{prefixes[module]}.{leaf}"
    return names


# MXNet's `.params` layout (`mx.nd.save`: NDArray::Save in src/ndarray/ndarray.cc), read here only
# far enough to check the sizes it claims before MXNet allocates them: MXNet allocates each array
# as its header says before reading its bytes, so a damaged header can make it take gigabytes.
PARAMS_LIST_MAGIC = 0x112
PARAMS_ARRAY_MAGICS = (0xF993FAC9, 0xF993FACA)  # with a storage type; NumPy-mode files use the second
PARAMS_V1_MAGIC = 0xF993FAC8  # 1.0's layout, without a storage type
PARAMS_DTYPE_BYTES = {0: 4, 1: 8, 2: 2, 3: 1, 4: 4, 5: 1, 6: 8, 7: 1, 8: 2, 9: 2, 10: 4, 11: 8, 12: 2}


def check_params_sizes(data: bytes, source) -> None:
    """Refuse a `.params` file whose arrays or names claim more bytes than the file holds, or
    whose arrays are not the dense ones Gluon writes."""

    def refuse(problem):
        return ZooError(f"{source} is not a readable MXNet .params file (truncated or corrupt?): {problem}")

    offset = 0

    def take(fmt):
        nonlocal offset
        size = struct.calcsize(fmt)
        if offset + size > len(data):
            raise refuse(f"it ends inside a header, at byte {offset}")
        values = struct.unpack_from(fmt, data, offset)
        offset += size
        return values

    magic, _, count = take("<QQQ")
    if magic != PARAMS_LIST_MAGIC:
        raise refuse(f"it does not start with MXNet's array-list mark (0x{PARAMS_LIST_MAGIC:x})")
    if count > len(data) // 8:
        raise refuse(f"it claims {count} arrays in {len(data)} bytes")
    for index in range(count):
        (array_magic,) = take("<I")
        if array_magic in PARAMS_ARRAY_MAGICS:
            (stype,) = take("<i")
            if stype != 0:
                raise refuse(f"array {index} is sparse (storage type {stype}); model parameters are dense")
        if array_magic in (PARAMS_V1_MAGIC, *PARAMS_ARRAY_MAGICS):
            (ndim,) = take("<i")
            dims = "q"
        else:  # the pre-1.0 layout: the mark is the number of dimensions, each a 32-bit count
            ndim, dims = array_magic, "I"
        if ndim <= 0:
            continue  # an empty array: nothing follows its shape
        if ndim > 32:
            raise refuse(f"array {index} claims {ndim} dimensions")
        shape = take(f"<{ndim}{dims}")
        _, _, dtype = take("<iii")  # device type and id, then the dtype
        if dtype not in PARAMS_DTYPE_BYTES or min(shape) < 0:
            raise refuse(f"array {index} has dtype code {dtype} and shape {shape}")
        size = PARAMS_DTYPE_BYTES[dtype] * int(np.prod(shape, dtype=object))
        if size > len(data) - offset:
            raise refuse(f"array {index} claims {size} bytes of data where {len(data) - offset} remain")
        offset += size
    (names,) = take("<Q")
    if names not in (0, count):
        raise refuse(f"it names {names} of its {count} arrays")
    for index in range(names):
        (length,) = take("<Q")
        if length > len(data) - offset:
            raise refuse(f"name {index} claims {length} bytes where {len(data) - offset} remain")
        offset += length


def from_gluon(params: dict, spec: DenseNetSpec, source: str = "Gluon parameters") -> dict[str, np.ndarray]:
    names = gluon_names(spec)
    missing = [name for name in names.values() if name not in params]
    extra = sorted(set(params) - set(names.values()))
    if missing or extra:
        raise ZooError(
            f"{source} does not fit Gluon's model-zoo {spec.name}: "
            + "; ".join(
                f"{len(items)} {title} parameter(s): {', '.join(items[:8])}"
                for title, items in (("missing", missing), ("unexpected", extra))
                if items
            )
        )
    return validate_state({key: np.asarray(params[name]) for key, name in names.items()}, spec, source=source)


def to_gluon(state: dict, spec: DenseNetSpec) -> dict[str, np.ndarray]:
    state = validate_state(state, spec)
    return {name: state[key] for key, name in gluon_names(spec).items()}


def check_gluon_spec(spec: DenseNetSpec, source) -> None:
    """Gluon's zoo builds only bottleneck nets without conv bias, ImageNet stem, compression 0.5."""
    if spec.stem != "imagenet" or spec.bn_size is None or spec.conv_bias or spec.compression != 0.5:
        raise ZooError(
            f"{source}: Gluon's model-zoo DenseNet cannot hold {spec.name} "
            f"(it needs the ImageNet stem, a bottleneck, no conv bias, compression 0.5)"
        )


def check_keras_spec(spec: DenseNetSpec, source) -> None:
    """Keras applications' builder fixes k=32, 64 init features, 3 input channels and the rest."""
    if spec != keras_spec(spec.block_config, spec.num_classes).replace(name=spec.name):
        raise ZooError(
            f"{source}: Keras applications' DenseNet cannot hold {spec.name} (it fixes the ImageNet stem "
            f"with 64 features, growth 32, a 4k bottleneck, no conv bias, compression 0.5, 3 channels)"
        )


# ---------------------------------------------------------------------------------------
# Reading and writing any format


def owner(fmt):
    """The zoo module of the backend whose framework reads and writes `fmt`."""
    try:
        return backend_module(OWNERS[fmt], "zoo")
    except BackendUnavailable as error:
        needs = f"the {OWNERS[fmt]} backend's framework"
        raise ZooError(f"reading or writing {FORMATS[fmt]} needs {needs}: {error}") from error


def read_file(path, fmt: str | None = None, arch=None) -> tuple[DenseNetSpec, dict[str, np.ndarray], list[str]]:
    """(spec, canonical state, notes) from a file in any format; only the owning framework is
    imported. The notes say in words what was done beyond renaming (an entry read, a prefix removed)."""
    fmt = detect_format(path, fmt)
    if not Path(path).is_file():
        raise ZooError(f"no weights file at {path}")
    if fmt == "canonical":
        metadata = read_metadata(path)
        if "spec" in metadata or "arch" in metadata:
            spec = check_arch(spec_of_checkpoint(path, metadata), arch, path)
            return spec, load_state(path, spec), []
        # A safetensors file without our metadata (as model hubs store weights): its tensors tell
        state, notes = from_checkpoint(load_tensors(path), str(path))
        notes.insert(0, "no densenet-xf metadata: the architecture is inferred from the tensors")
    else:
        try:
            state, notes = owner(fmt).read_zoo(path, fmt)
        except SpecError as error:  # shapes from which no DenseNet can be built
            raise ZooError(f"{path} does not describe a DenseNet: {error}") from None
    spec = check_arch(infer_spec(state, str(path)), arch, path)
    state = validate_state(state, spec, source=str(path))
    return spec, {key: value.astype(np.float32, copy=False) for key, value in state.items()}, notes


def read_weights(path, fmt: str | None = None, arch=None) -> tuple[DenseNetSpec, dict[str, np.ndarray]]:
    """(spec, canonical state) from a file in any format (read_file without the notes)."""
    spec, state, _ = read_file(path, fmt, arch)
    return spec, state


def write_weights(path, state: dict, spec: DenseNetSpec, fmt: str | None = None) -> None:
    """Write a canonical state in `fmt` (default: from the suffix), atomically; a missing
    directory is created, as for every file the project writes."""
    fmt = detect_format(path, fmt)
    if fmt == "canonical":
        save_state(path, state, spec)
    else:
        owner(fmt).write_zoo(path, validate_state(state, spec), spec, fmt)


def convert(src, dst, arch=None, src_format=None, dst_format=None) -> tuple[DenseNetSpec, list[str]]:
    """Read `src`, write `dst`; the spec and the notes of read_file."""
    spec, state, notes = read_file(src, src_format, arch)
    write_weights(dst, state, spec, dst_format)
    return spec, notes


def zoo_spec(name: str, num_classes: int = 1000) -> DenseNetSpec:
    if name not in ZOO_ARCHS:
        raise ZooError(f"unknown zoo model {name!r}; valid: {', '.join(ZOO_ARCHS)}")
    spec = get_spec(name)
    return spec if num_classes == spec.num_classes else spec.replace(num_classes=num_classes)


def weights_for(name: str, weights, num_classes: int) -> tuple[DenseNetSpec, dict | None]:
    """The spec and (if `weights` is a path) the state a zoo-style constructor builds."""
    spec = zoo_spec(name, num_classes)
    if weights is None or weights is False:
        return spec, None
    file_spec, state = read_weights(weights)
    if file_spec.replace(name=spec.name, num_classes=spec.num_classes) != spec:
        raise ZooError(f"{weights} holds {file_spec.name}, not {name}")
    if file_spec.num_classes != num_classes:
        raise ZooError(
            f"{weights} has {file_spec.num_classes} classes, not num_classes={num_classes}; "
            f"load it with its own class count and replace the classifier to fine-tune (docs/zoo.md)"
        )
    return spec, state


# ---------------------------------------------------------------------------------------
# The zoo row of `make conformance`: each owner writes a small zoo model's file (random
# weights and BatchNorm statistics) and its logits; every backend reproduces them.

SAMPLES = {  # format -> (spec, input size): small, and 224 where Gluon's AvgPool2D(7) needs a 7x7 map
    "torchvision": (get_spec("tiny"), 32),
    "keras-h5": (keras_spec((1, 1, 2, 1), 7), 32),
    "gluon": (DenseNetSpec("gluon_small", "imagenet", 8, 4, (1, 1, 1, 1), 2, 0.5, False, 3, 5), 224),
}
SAMPLE_SUFFIX = {"torchvision": ".pth", "keras-h5": ".h5", "gluon": ".params"}


def sample_images(size: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(5).uniform(-2, 2, (batch, 3, size, size)).astype(np.float32)


def random_bn(rng, key: str, shape) -> np.ndarray:
    """Random BatchNorm state by canonical leaf, so that a check tells gamma from beta and mean from var."""
    low, high = (0.5, 2.0) if key.endswith(("weight", "running_var")) else (-0.5, 0.5)
    return rng.uniform(low, high, shape).astype(np.float32)
