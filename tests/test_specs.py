import numpy as np
import pytest

from conformance import specs
from conformance.specs import ARCHS, EXPECTED_PARAMS, InputError, SpecError


@pytest.mark.parametrize("arch", sorted(EXPECTED_PARAMS))
def test_parameter_counts_match_published_numbers(arch):
    assert specs.count_params(ARCHS[arch])[0] == EXPECTED_PARAMS[arch]


@pytest.mark.parametrize(
    "arch, millions",
    [("densenet40_k12", 1.0), ("densenet_bc100_k12", 0.8), ("densenet_bc250_k24", 15.3), ("densenet_bc190_k40", 25.6)],
)
def test_cifar_nets_match_the_paper_table(arch, millions):
    assert round(specs.count_params(ARCHS[arch])[0] / 1e6, 1) == millions


def test_cifar_depth_counts_layers():
    assert ARCHS["densenet40_k12"].block_config == (12, 12, 12)
    assert ARCHS["densenet_bc100_k12"].block_config == (16, 16, 16)
    assert ARCHS["densenet_bc190_k40"].num_init_features == 80


def test_d2l_stage_shapes_at_96():
    shapes = specs.stage_shapes(ARCHS["d2l"], 96, batch=2)
    assert shapes["stem"] == (2, 64, 24, 24)
    assert shapes["denseblock1"] == (2, 192, 24, 24)
    assert shapes["transition1"] == (2, 96, 12, 12)
    assert shapes["denseblock4"] == (2, 248, 3, 3)
    assert shapes["logits"] == (2, 10)
    assert list(shapes) == [
        "stem",
        "denseblock1",
        "transition1",
        "denseblock2",
        "transition2",
        "denseblock3",
        "transition3",
        "denseblock4",
        "logits",
    ]


def test_nhwc_shapes_are_nchw_transposed():
    nchw = specs.stage_shapes(ARCHS["densenet121"], 64, 3, "NCHW")
    nhwc = specs.stage_shapes(ARCHS["densenet121"], 64, 3, "NHWC")
    assert {k: specs.shape_to_nchw(v, "NHWC") for k, v in nhwc.items()} == nchw


def test_too_small_names_the_smallest_size():
    with pytest.raises(InputError, match=r"28x28 is too small for d2l.*smallest input that works is 29x29"):
        specs.stage_shapes(ARCHS["d2l"], 28)
    with pytest.raises(InputError, match="densenet121.*29x29"):
        specs.check_input_size(ARCHS["densenet121"], 28)
    specs.check_input_size(ARCHS["d2l"], 29)


def test_unknown_arch_lists_valid_names():
    with pytest.raises(SpecError, match="unknown architecture 'resnet'.*d2l.*densenet121"):
        specs.get_spec("resnet")


def test_spec_rejects_inconsistent_values():
    with pytest.raises(SpecError, match="compression"):
        ARCHS["d2l"].replace(compression=0.0)
    with pytest.raises(SpecError, match="stem"):
        ARCHS["d2l"].replace(stem="vgg")


def test_spec_json_round_trip():
    spec = ARCHS["densenet_bc100_k12"]
    assert specs.DenseNetSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    "shape, dtype, match",
    [
        ((1, 96, 96), "float32", r"4-D NCHW batch.*rank 3.*add a batch axis"),
        ((2, 3, 96, 96), "float32", r"1 input channel\(s\) on axis 1.*got 3"),
        ((2, 96, 96, 1), "float32", r"looks like NHWC; transpose it with \(0, 3, 1, 2\)"),
        ((2, 1, 96, 96), "uint8", r"expects float32 input, got uint8"),
        ((2, 1, 20, 20), "float32", r"too small.*29x29"),
    ],
)
def test_input_validation_says_what_was_expected(shape, dtype, match):
    with pytest.raises(InputError, match=match):
        specs.validate_input(ARCHS["d2l"], shape, dtype, "NCHW")


def test_nhwc_validation_points_at_nchw_input():
    with pytest.raises(InputError, match=r"looks like NCHW; transpose it with \(0, 2, 3, 1\)"):
        specs.validate_input(ARCHS["densenet121"], (2, 3, 64, 64), "float32", "NHWC")
    specs.validate_input(ARCHS["densenet121"], (None, 64, 64, 3), "float32", "NHWC")


def test_parameter_table_uses_torchvision_names():
    table = specs.parameter_table(ARCHS["densenet121"])
    assert table["features.conv0.weight"] == (64, 3, 7, 7)
    assert table["features.denseblock1.denselayer1.conv1.weight"] == (128, 64, 1, 1)
    assert table["features.denseblock1.denselayer1.conv2.weight"] == (32, 128, 3, 3)
    assert table["features.transition1.conv.weight"] == (128, 256, 1, 1)
    assert table["features.norm5.running_var"] == (1024,)
    assert table["classifier.weight"] == (1000, 1024)
    assert "features.conv0.bias" not in table


def test_to_layout_round_trip(rng):
    x = rng.standard_normal((2, 3, 5, 7))
    nhwc = specs.to_layout(x, "NHWC")
    assert nhwc.shape == (2, 5, 7, 3)
    np.testing.assert_array_equal(nhwc.transpose(0, 3, 1, 2), x)
