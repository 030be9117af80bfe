"""Every DenseNet architecture as data, and what follows from it without a framework.

A `DenseNetSpec` is the one description all four backends build from. From it this module
derives the channel plan, the canonical parameter table (torchvision key names, PyTorch
layout), the output shape of every stage for any input size, and the input checks that
give a clear error before a framework gives a cryptic one.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from dataclasses import dataclass

STEMS = ("imagenet", "cifar")
LAYOUTS = ("NCHW", "NHWC")


class SpecError(ValueError):
    """An unknown architecture name or an inconsistent spec."""


class InputError(ValueError):
    """An input batch that the architecture cannot take (rank, channels, layout, dtype, size)."""


@dataclass(frozen=True)
class DenseNetSpec:
    name: str
    stem: str  # "imagenet": 7x7/2 conv + BN + ReLU + 3x3/2 max-pool; "cifar": one 3x3 conv
    num_init_features: int
    growth_rate: int
    block_config: tuple[int, ...]
    bn_size: int | None  # None: no 1x1 bottleneck (the d2l chapter, the paper's basic nets)
    compression: float  # transition output channels = floor(compression * input channels)
    conv_bias: bool
    in_channels: int
    num_classes: int
    drop_rate: float = 0.0

    def __post_init__(self):
        if self.stem not in STEMS:
            raise SpecError(f"stem must be one of {STEMS}, got {self.stem!r}")
        if not self.block_config or min(self.block_config) < 1:
            raise SpecError(f"block_config needs at least one block of at least one layer, got {self.block_config}")
        if not 0.0 < self.compression <= 1.0:
            raise SpecError(f"compression must be in (0, 1], got {self.compression}")
        if self.bn_size is not None and self.bn_size < 1:
            raise SpecError(f"bn_size must be None or >= 1, got {self.bn_size}")
        for field in ("num_init_features", "growth_rate", "in_channels", "num_classes"):
            if getattr(self, field) < 1:
                raise SpecError(f"{field} must be >= 1, got {getattr(self, field)}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise SpecError(f"drop_rate must be in [0, 1), got {self.drop_rate}")

    def replace(self, **changes) -> DenseNetSpec:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DenseNetSpec:
        fields = json.loads(text)
        fields["block_config"] = tuple(fields["block_config"])
        return cls(**fields)


def _imagenet(name, init, growth, blocks):
    return DenseNetSpec(
        name,
        "imagenet",
        init,
        growth,
        blocks,
        bn_size=4,
        compression=0.5,
        conv_bias=False,
        in_channels=3,
        num_classes=1000,
    )


def _cifar(name, depth, growth, bottleneck):
    # The paper's CIFAR nets: 3 blocks; depth counts the conv layers and the classifier.
    # Basic nets (no bottleneck, no compression) start with 16 channels, BC nets with 2k.
    layers = (depth - 4) // (6 if bottleneck else 3)
    return DenseNetSpec(
        name,
        "cifar",
        2 * growth if bottleneck else 16,
        growth,
        (layers,) * 3,
        bn_size=4 if bottleneck else None,
        compression=0.5 if bottleneck else 1.0,
        conv_bias=False,
        in_channels=3,
        num_classes=10,
    )


ARCHS: dict[str, DenseNetSpec] = {
    # Dive into Deep Learning, chapter "Densely Connected Networks (DenseNet)".
    "d2l": DenseNetSpec(
        "d2l",
        "imagenet",
        64,
        32,
        (4, 4, 4, 4),
        bn_size=None,
        compression=0.5,
        conv_bias=True,
        in_channels=1,
        num_classes=10,
    ),
    "densenet121": _imagenet("densenet121", 64, 32, (6, 12, 24, 16)),
    "densenet161": _imagenet("densenet161", 96, 48, (6, 12, 36, 24)),
    "densenet169": _imagenet("densenet169", 64, 32, (6, 12, 32, 32)),
    "densenet201": _imagenet("densenet201", 64, 32, (6, 12, 48, 32)),
    "densenet264": _imagenet("densenet264", 64, 32, (6, 12, 64, 48)),
    "densenet40_k12": _cifar("densenet40_k12", 40, 12, bottleneck=False),
    "densenet_bc100_k12": _cifar("densenet_bc100_k12", 100, 12, bottleneck=True),
    "densenet_bc250_k24": _cifar("densenet_bc250_k24", 250, 24, bottleneck=True),
    "densenet_bc190_k40": _cifar("densenet_bc190_k40", 190, 40, bottleneck=True),
    # A small net for fast tests: both kinds of dense layer appear in the suite through
    # "tiny" (bottleneck, no bias) and "tiny_d2l" (no bottleneck, conv bias).
    "tiny": DenseNetSpec(
        "tiny", "imagenet", 8, 4, (2, 2), bn_size=2, compression=0.5, conv_bias=False, in_channels=3, num_classes=5
    ),
    "tiny_d2l": DenseNetSpec(
        "tiny_d2l",
        "imagenet",
        8,
        4,
        (2, 2),
        bn_size=None,
        compression=0.5,
        conv_bias=True,
        in_channels=1,
        num_classes=10,
    ),
}

# Trainable parameter counts published for the named nets (torchvision, the d2l book);
# tests compare every backend with these.
EXPECTED_PARAMS = {
    "d2l": 758_226,
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "densenet264": 33_337_704,
}


def get_spec(arch: str | DenseNetSpec) -> DenseNetSpec:
    if isinstance(arch, DenseNetSpec):
        return arch
    try:
        return ARCHS[arch]
    except KeyError:
        raise SpecError(f"unknown architecture {arch!r}; valid names: {', '.join(ARCHS)}") from None


# ---------------------------------------------------------------------------------------
# The channel plan and the canonical parameter table


@dataclass(frozen=True)
class DenseLayerPlan:
    key: str  # "features.denseblock1.denselayer1"
    in_channels: int


@dataclass(frozen=True)
class StagePlan:
    name: str  # "stem", "denseblock1", "transition1", ...
    in_channels: int
    out_channels: int
    layers: tuple[DenseLayerPlan, ...] = ()


def channel_plan(spec: DenseNetSpec) -> list[StagePlan]:
    """Stem, then each dense block followed by its transition (none after the last)."""
    plan = [StagePlan("stem", spec.in_channels, spec.num_init_features)]
    channels = spec.num_init_features
    for b, num_layers in enumerate(spec.block_config, start=1):
        block = f"features.denseblock{b}"
        layers = tuple(
            DenseLayerPlan(f"{block}.denselayer{i + 1}", channels + i * spec.growth_rate) for i in range(num_layers)
        )
        out = channels + num_layers * spec.growth_rate
        plan.append(StagePlan(f"denseblock{b}", channels, out, layers))
        channels = out
        if b < len(spec.block_config):
            out = int(channels * spec.compression)
            plan.append(StagePlan(f"transition{b}", channels, out))
            channels = out
    return plan


def final_channels(spec: DenseNetSpec) -> int:
    return channel_plan(spec)[-1].out_channels


def _conv(table, key, out_c, in_c, k, bias):
    table[f"{key}.weight"] = (out_c, in_c, k, k)
    if bias:
        table[f"{key}.bias"] = (out_c,)


def _norm(table, key, c):
    for suffix in ("weight", "bias", "running_mean", "running_var"):
        table[f"{key}.{suffix}"] = (c,)


def parameter_table(spec: DenseNetSpec) -> OrderedDict[str, tuple[int, ...]]:
    """Canonical key -> shape, in network order (PyTorch layout, torchvision names).

    A dense layer with a bottleneck holds norm1, conv1 (1x1), norm2, conv2 (3x3), as in
    torchvision; one without (d2l, the basic CIFAR nets) holds norm1 and conv1 (3x3).
    """
    table: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    k, bias = spec.growth_rate, spec.conv_bias
    for stage in channel_plan(spec):
        if stage.name == "stem":
            kernel = 7 if spec.stem == "imagenet" else 3
            _conv(table, "features.conv0", stage.out_channels, stage.in_channels, kernel, bias)
            if spec.stem == "imagenet":
                _norm(table, "features.norm0", stage.out_channels)
        elif stage.name.startswith("denseblock"):
            for layer in stage.layers:
                _norm(table, f"{layer.key}.norm1", layer.in_channels)
                if spec.bn_size is None:
                    _conv(table, f"{layer.key}.conv1", k, layer.in_channels, 3, bias)
                else:
                    _conv(table, f"{layer.key}.conv1", spec.bn_size * k, layer.in_channels, 1, bias)
                    _norm(table, f"{layer.key}.norm2", spec.bn_size * k)
                    _conv(table, f"{layer.key}.conv2", k, spec.bn_size * k, 3, bias)
        else:
            key = f"features.{stage.name}"
            _norm(table, f"{key}.norm", stage.in_channels)
            _conv(table, f"{key}.conv", stage.out_channels, stage.in_channels, 1, bias)
    _norm(table, "features.norm5", final_channels(spec))
    table["classifier.weight"] = (spec.num_classes, final_channels(spec))
    table["classifier.bias"] = (spec.num_classes,)
    return table


def is_running_stat(key: str) -> bool:
    return key.endswith(".running_mean") or key.endswith(".running_var")


def count_params(spec: DenseNetSpec) -> tuple[int, int]:
    """(trainable, non-trainable) parameter counts; BN running statistics are the latter."""
    trainable = non_trainable = 0
    for key, shape in parameter_table(spec).items():
        size = 1
        for dim in shape:
            size *= dim
        if is_running_stat(key):
            non_trainable += size
        else:
            trainable += size
    return trainable, non_trainable


# ---------------------------------------------------------------------------------------
# Stage shapes for any input size, and input validation


def _pooled(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _spatial_plan(spec: DenseNetSpec, hw: tuple[int, int]) -> list[tuple[str, tuple[int, int]]]:
    h, w = hw
    if spec.stem == "imagenet":
        h, w = _pooled(h, 7, 2, 3), _pooled(w, 7, 2, 3)  # conv0
        h, w = _pooled(h, 3, 2, 1), _pooled(w, 3, 2, 1)  # pool0
    out = [("stem", (h, w))]
    for stage in channel_plan(spec)[1:]:
        if stage.name.startswith("transition"):
            h, w = h // 2, w // 2
        out.append((stage.name, (h, w)))
    return out


def _as_hw(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def min_input_size(spec: DenseNetSpec) -> int:
    """The smallest square input for which every stage keeps at least 1x1 pixels."""
    size = 1
    while min(min(hw) for _, hw in _spatial_plan(spec, (size, size))) < 1:
        size += 1
    return size


def check_input_size(spec: DenseNetSpec, size) -> None:
    h, w = _as_hw(size)
    for stage, (sh, sw) in _spatial_plan(spec, (h, w)):
        if sh < 1 or sw < 1:
            smallest = min_input_size(spec)
            raise InputError(
                f"input {h}x{w} is too small for {spec.name}: {stage} would be {max(sh, 0)}x{max(sw, 0)}; "
                f"the smallest input that works is {smallest}x{smallest}"
            )


def stage_shapes(spec: DenseNetSpec, size, batch: int = 1, layout: str = "NCHW") -> OrderedDict[str, tuple[int, ...]]:
    """Output shape of every stage (stem, dense blocks, transitions, logits) in `layout`."""
    check_layout(layout)
    check_input_size(spec, size)
    channels = {stage.name: stage.out_channels for stage in channel_plan(spec)}
    shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    for stage, (h, w) in _spatial_plan(spec, _as_hw(size)):
        c = channels[stage]
        shapes[stage] = (batch, c, h, w) if layout == "NCHW" else (batch, h, w, c)
    shapes["logits"] = (batch, spec.num_classes)
    return shapes


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def validate_input(
    spec: DenseNetSpec, shape, dtype: str, layout: str, expected_dtype: str | tuple[str, ...] = "float32"
) -> None:
    """Raise InputError naming what is wrong with an input batch and what was expected.

    `shape` may hold None for dimensions unknown at trace time (Keras); those are not checked.
    """
    check_layout(layout)
    shape = tuple(shape)
    axes = "(N, C, H, W)" if layout == "NCHW" else "(N, H, W, C)"
    if len(shape) != 4:
        hint = " (add a batch axis for a single image)" if len(shape) == 3 else ""
        raise InputError(
            f"{spec.name} expects a 4-D {layout} batch {axes}, got shape {shape} of rank {len(shape)}{hint}"
        )
    c_axis, other_axis = (1, 3) if layout == "NCHW" else (3, 1)
    channels = shape[c_axis]
    if channels is not None and channels != spec.in_channels:
        if shape[other_axis] == spec.in_channels:
            other = "NHWC" if layout == "NCHW" else "NCHW"
            perm = "(0, 3, 1, 2)" if layout == "NCHW" else "(0, 2, 3, 1)"
            raise InputError(
                f"{spec.name} expects {layout} input {axes} with {spec.in_channels} channel(s) on axis {c_axis}, "
                f"got shape {shape}, which looks like {other}; transpose it with {perm}"
            )
        raise InputError(
            f"{spec.name} expects {spec.in_channels} input channel(s) on axis {c_axis} of an {layout} batch {axes}, "
            f"got {channels} (shape {shape})"
        )
    expected = (expected_dtype,) if isinstance(expected_dtype, str) else tuple(expected_dtype)
    if dtype not in expected:
        raise InputError(
            f"{spec.name} expects {' or '.join(expected)} input, got {dtype}; "
            "convert (and scale images to [0, 1]) first"
        )
    h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
    if h is not None and w is not None:
        check_input_size(spec, (h, w))


def to_layout(x_nchw, layout: str):
    """An NCHW array in `layout` (NHWC backends take (N, H, W, C))."""
    check_layout(layout)
    return x_nchw if layout == "NCHW" else x_nchw.transpose(0, 2, 3, 1).copy()


def shape_to_nchw(shape, layout: str) -> tuple:
    """A 4-D shape in `layout` as the NCHW shape of the same tensor; 2-D shapes are unchanged."""
    check_layout(layout)
    shape = tuple(shape)
    if layout == "NCHW" or len(shape) != 4:
        return shape
    n, h, w, c = shape
    return (n, c, h, w)
