"""Model-zoo interop: each zoo's own model, saved in its own format, converted, reproduced by
every backend; exported back and reproduced by the zoo's model; bad files give clear errors.

torchvision cannot be imported here (its wheels are CUDA builds), so its path is tested with
state dicts in both key layouts written from our PyTorch backend, whose keys are torchvision's.
"""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import backend_or_skip

from conformance import specs, zoo
from conformance.cli import main
from conformance.weights import CheckpointError, init_state, save_state

BACKENDS = ("torch", "mxnet", "tf", "jax")
REL_TOL = 1e-5  # float32 logits of the same weights through different kernels; measured ~1e-7..1e-6

# Keras applications' builder fixes k=32 and 64 init features; 4 blocks of 1-2 layers keep it small.
KERAS_SPEC = zoo.keras_spec((1, 1, 2, 1), 7)
# Gluon's zoo ends in AvgPool2D(7): the last map must be 7x7, so 4 blocks at 224x224.
GLUON_SPEC = specs.DenseNetSpec(
    "gluon_small",
    "imagenet",
    8,
    4,
    (1, 1, 1, 1),
    bn_size=2,
    compression=0.5,
    conv_bias=False,
    in_channels=3,
    num_classes=5,
)


def rel_error(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def images(size, seed=0):
    return np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)


def backend_logits(name, spec, state, x_nchw):
    backend = backend_or_skip(name)
    model = backend.build(spec)
    backend.load_state(model, state)
    return backend.forward(model, specs.to_layout(x_nchw, backend.layout), train=False)


def assert_every_backend_reproduces(spec, state, x_nchw, expected, backends=BACKENDS):
    errors = {name: rel_error(backend_logits(name, spec, state, x_nchw), expected) for name in backends}
    assert max(errors.values()) < REL_TOL, errors


# ---------------------------------------------------------------------------------------
# framework-free parts


def test_formats_by_suffix_and_override():
    assert [zoo.detect_format(p) for p in ("a.safetensors", "a.pth", "a.pt", "a.h5", "a.weights.h5", "a.params")] == [
        "canonical",
        "torchvision",
        "torchvision",
        "keras-h5",
        "keras",
        "gluon",
    ]
    assert zoo.detect_format("weights.dat", "gluon") == "gluon"
    assert zoo.detect_format("model_best.pth.tar") == zoo.detect_format("pytorch_model.bin") == "torchvision"
    with pytest.raises(zoo.ZooError, match="weights.dat"):
        zoo.detect_format("weights.dat")
    with pytest.raises(zoo.ZooError, match="unknown format"):
        zoo.detect_format("a.pth", "onnx")


@pytest.mark.parametrize(
    "arch", ["tiny", "tiny_d2l", "densenet121", "densenet161", "densenet_bc100_k12", "densenet40_k12"]
)
def test_infer_spec_names_every_architecture(arch):
    spec = specs.get_spec(arch)
    state = {key: np.zeros(shape, np.float32) for key, shape in specs.parameter_table(spec).items()}
    assert zoo.infer_spec(state) == spec


def test_infer_spec_of_an_unnamed_net_and_arch_check():
    spec = zoo.infer_spec({k: np.zeros(s, np.float32) for k, s in specs.parameter_table(GLUON_SPEC).items()})
    assert spec.replace(name="gluon_small") == GLUON_SPEC
    with pytest.raises(zoo.ZooError, match="not densenet121"):
        zoo.check_arch(spec, "densenet121", "x.pth")


def test_torchvision_legacy_keys_round_trip():
    state = init_state(specs.get_spec("tiny"))
    legacy = zoo.to_torchvision(state, legacy=True)
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    assert "features.denseblock1.denselayer1.conv.2.weight" in legacy
    assert "features.transition1.norm.weight" in legacy  # transitions were never renamed
    assert zoo.from_torchvision({**legacy, "features.norm0.num_batches_tracked": np.zeros(())}).keys() == state.keys()


def test_keras_and_gluon_names_are_a_bijection():
    spec = specs.get_spec("densenet121")
    state = init_state(spec)
    keras_layers = zoo.to_keras(state, spec)
    assert {
        "conv1_conv",
        "conv1_bn",
        "conv2_block6_2_conv",
        "pool4_conv",
        "conv5_block16_0_bn",
        "bn",
        "predictions",
    } <= set(keras_layers)
    assert keras_layers["conv1_conv"][0].shape == (7, 7, 3, 64)  # HWIO
    back = zoo.from_keras(keras_layers, spec)
    assert all(np.allclose(back[k], state[k], rtol=0, atol=1e-7) for k in state)
    gluon = zoo.to_gluon(state, spec)
    assert "features.4.5.1.5.weight" in gluon and "features.11.gamma" in gluon and "output.bias" in gluon
    assert zoo.gluon_spec({k: v.shape for k, v in gluon.items()}) == spec


def test_keras_epsilon_is_folded_into_the_running_variance():
    """Keras divides by sqrt(v + 1.001e-5), we by sqrt(v + 1e-5): conversion adds 1e-8 to v."""
    spec = KERAS_SPEC
    state = init_state(spec, randomize_bn=True)
    state["features.norm5.running_var"][:] = 1e-6  # where the epsilons differ by 0.5%
    keras_var = zoo.to_keras(state, spec)["bn"][3]
    ours = 1 / np.sqrt(np.float64(state["features.norm5.running_var"]) + zoo.CANONICAL_BN_EPS)
    theirs = 1 / np.sqrt(np.float64(keras_var) + zoo.KERAS_BN_EPS)
    assert rel_error(theirs, ours) < 1e-6


# ---------------------------------------------------------------------------------------
# torchvision


@pytest.mark.parametrize("legacy", [False, True], ids=["today", "pre-2018"])
def test_torchvision_state_dicts_convert_and_reproduce(tmp_path, legacy):
    torch = pytest.importorskip("torch")
    from densenet_torch import zoo as torch_zoo
    from densenet_torch.model import DenseNet

    spec = specs.get_spec("tiny")
    torch.manual_seed(0)
    model = DenseNet(spec)
    for name, buffer in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            buffer.uniform_(0.5, 2.0)
    x = images(32)
    expected = model.eval()(torch.from_numpy(x)).detach().numpy()
    state = {k: v.numpy() for k, v in model.state_dict().items()}  # with num_batches_tracked, as torchvision's
    src = tmp_path / "tv.pth"
    torch.save({k: torch.from_numpy(v) for k, v in zoo.to_torchvision(state, legacy).items()}, src)
    assert main(["convert", str(src), str(tmp_path / "c.safetensors"), "--arch", "tiny"]) == 0
    spec2, canonical = zoo.read_weights(tmp_path / "c.safetensors")
    assert spec2 == spec
    assert_every_backend_reproduces(spec, canonical, x, expected)
    torch_zoo.write_zoo(tmp_path / "back.pth", canonical, spec)
    reloaded = DenseNet(spec)
    reloaded.load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True))  # strict, as torchvision's
    assert rel_error(reloaded.eval()(torch.from_numpy(x)).detach().numpy(), expected) == 0


# ---------------------------------------------------------------------------------------
# Keras applications


def keras_zoo_model(seed=0):
    pytest.importorskip("tensorflow")
    from densenet_tf import zoo as tf_zoo

    model = tf_zoo.keras_application(KERAS_SPEC, input_shape=(32, 32, 3))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.name.endswith("bn"):  # random gamma, beta, moving mean and variance
            c = layer.weights[0].shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c),
                    rng.uniform(-0.5, 0.5, c),
                    rng.uniform(-0.5, 0.5, c),
                    rng.uniform(0.5, 2.0, c),
                ]
            )
    return model


def keras_logits(model, x_nchw):
    return np.asarray(model(x_nchw.transpose(0, 2, 3, 1), training=False))


@pytest.mark.parametrize("suffix,backends", [(".h5", BACKENDS), (".weights.h5", ("torch",)), (".keras", ("torch",))])
def test_keras_applications_file_converts_and_reproduces(tmp_path, suffix, backends):
    """Every backend for the legacy file; the Keras 3 file reads to the same state, so one suffices."""
    from densenet_tf import zoo as tf_zoo

    model = keras_zoo_model()
    x = images(32)
    expected = keras_logits(model, x)
    src = tmp_path / f"keras{suffix}"
    tf_zoo.write_zoo(
        src,
        zoo.from_keras({l.name: [w.numpy() for w in l.weights] for l in model.layers}, KERAS_SPEC),
        KERAS_SPEC,
        zoo.detect_format(src),
    )
    spec, state = zoo.read_weights(src)
    assert spec == KERAS_SPEC
    assert_every_backend_reproduces(spec, state, x, expected, backends)
    # ... and back: Keras' own builder and load_weights reproduce our logits.
    ours = backend_logits("torch", spec, state, x)
    dst = tmp_path / f"back{suffix}"
    assert main(["convert", str(src), str(tmp_path / "c.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "c.safetensors"), str(dst)]) == 0
    fresh = tf_zoo.keras_application(spec, input_shape=(32, 32, 3))
    fresh.load_weights(str(dst))
    assert rel_error(keras_logits(fresh, x), ours) < REL_TOL


def test_keras_file_of_another_model_is_refused(tmp_path):
    keras = pytest.importorskip("keras")
    pytest.importorskip("densenet_tf")
    other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, name="dense")])
    path = tmp_path / "other.weights.h5"
    other.save_weights(str(path))
    with pytest.raises(CheckpointError, match=r"other\.weights\.h5 is not a Keras applications DenseNet"):
        zoo.read_weights(path)


# ---------------------------------------------------------------------------------------
# Gluon model zoo


def gluon_zoo_model():
    backend_or_skip("mxnet")
    import mxnet as mx

    from densenet_mxnet import zoo as mx_zoo

    net = mx_zoo.gluon_application(GLUON_SPEC)
    rng = np.random.default_rng(1)
    with mx_zoo.legacy_mode():
        net.initialize(mx.init.Xavier())
        net(mx.nd.zeros((1, 3, 224, 224)))  # the zoo's layers infer their input widths
        for name, param in net.collect_params().items():
            if name.endswith(("gamma", "beta", "running_mean", "running_var")):
                low, high = (0.5, 2.0) if name.endswith(("gamma", "running_var")) else (-0.5, 0.5)
                param.set_data(mx.nd.array(rng.uniform(low, high, param.shape)))
    return net


def gluon_logits(net, x_nchw):
    import mxnet as mx

    from densenet_mxnet import zoo as mx_zoo

    with mx_zoo.legacy_mode():
        return net(mx.nd.array(x_nchw)).asnumpy()


def test_gluon_model_zoo_file_converts_and_reproduces(tmp_path):
    net = gluon_zoo_model()
    import mxnet as mx  # noqa: F401

    from densenet_mxnet import zoo as mx_zoo

    x = images(224)
    expected = gluon_logits(net, x)
    src = tmp_path / "gluon.params"
    with mx_zoo.legacy_mode():
        net.save_parameters(str(src))
    spec, state = zoo.read_weights(src)
    assert spec.replace(name=GLUON_SPEC.name) == GLUON_SPEC
    assert_every_backend_reproduces(spec, state, x, expected)
    ours = backend_logits("torch", spec, state, x)
    dst = tmp_path / "back.params"
    zoo.write_weights(dst, state, spec)
    fresh = mx_zoo.gluon_application(spec)
    with mx_zoo.legacy_mode():
        fresh.load_parameters(str(dst))  # strict: no missing or extra parameter
    assert rel_error(gluon_logits(fresh, x), ours) < REL_TOL


def test_gluon_file_with_missing_parameters(tmp_path):
    backend_or_skip("mxnet")  # densenet_mxnet first: it prepares NumPy 2 for mxnet
    import mxnet as mx

    from densenet_mxnet import zoo as mx_zoo

    params = zoo.to_gluon(init_state(GLUON_SPEC), GLUON_SPEC)
    del params["features.4.0.1.3.running_var"]
    path = tmp_path / "missing.params"
    with mx_zoo.legacy_mode():
        mx.nd.save(str(path), {k: mx.nd.array(v) for k, v in params.items()})
    with pytest.raises(
        CheckpointError, match=r"missing\.params.*missing parameter\(s\): features\.4\.0\.1\.3\.running_var"
    ):
        zoo.read_weights(path)


# ---------------------------------------------------------------------------------------
# bad files


class RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"features.conv0.weight": RunsCode()}))
    with pytest.raises(CheckpointError, match=r"evil\.pth was refused by torch.load\(weights_only=True\)"):
        zoo.read_weights(path)


def test_pickle_that_is_not_a_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(CheckpointError, match=r"list\.pth holds a list, not a state dict"):
        zoo.read_weights(path)
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other\.pth is not a DenseNet state"):
        zoo.read_weights(tmp_path / "other.pth")


@pytest.mark.parametrize(
    "fmt,framework", [("pth", "torch"), ("params", "mxnet"), ("weights.h5", "tensorflow"), ("safetensors", None)]
)
def test_truncated_files(tmp_path, fmt, framework):
    if framework:
        pytest.importorskip(framework)
    spec = specs.get_spec("densenet121") if fmt == "weights.h5" else GLUON_SPEC
    if fmt == "weights.h5":
        spec = KERAS_SPEC
    whole = tmp_path / f"whole.{fmt}"
    zoo.write_weights(whole, init_state(spec), spec)
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"cut\.{fmt}"):
        zoo.read_weights(cut)
    assert main(["convert", str(cut), str(tmp_path / "x.safetensors")]) == 2


def test_convert_cli_reports_what_it_did(tmp_path, capsys):
    spec = specs.get_spec("tiny")
    save_state(tmp_path / "a.safetensors", init_state(spec), spec)
    assert main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "b.bin"), "--to", "canonical"]) == 0
    assert '"arch": "tiny"' in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "b.pth"), "--arch", "d2l"]) == 2
    assert "not d2l" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# constructors people know


@pytest.fixture(scope="module")
def densenet121_pth(tmp_path_factory):
    pytest.importorskip("torch")
    spec = specs.get_spec("densenet121")
    path = tmp_path_factory.mktemp("zoo") / "densenet121.pth"
    zoo.write_weights(path, init_state(spec, seed=3, randomize_bn=True), spec)
    return path


def test_constructors_load_any_format(densenet121_pth):
    import densenet_torch

    state = zoo.read_weights(densenet121_pth)[1]
    model = densenet_torch.densenet121(weights=str(densenet121_pth))
    assert np.array_equal(model.state_dict()["features.norm5.running_var"].numpy(), state["features.norm5.running_var"])
    with pytest.raises(CheckpointError, match="1000 classes, not num_classes=10"):
        densenet_torch.densenet121(weights=str(densenet121_pth), num_classes=10)
    with pytest.raises(CheckpointError, match="not densenet169"):
        densenet_torch.densenet169(weights=str(densenet121_pth))


@pytest.mark.slow
def test_every_backend_constructor_reproduces_torch(densenet121_pth):
    import torch

    import densenet_torch

    x = images(64)
    expected = densenet_torch.densenet121(weights=densenet121_pth).eval()(torch.from_numpy(x)).detach().numpy()
    backend_or_skip("tf")
    import densenet_tf

    model = densenet_tf.DenseNet121(weights=densenet121_pth)
    assert rel_error(np.asarray(model(x.transpose(0, 2, 3, 1))), expected) < REL_TOL
    features = densenet_tf.DenseNet121(include_top=False, weights=densenet121_pth, pooling="avg")
    assert tuple(features(x.transpose(0, 2, 3, 1)).shape) == (2, 1024)
    backend_or_skip("jax")
    import densenet_jax

    module, variables = densenet_jax.DenseNet121(weights=densenet121_pth)
    assert rel_error(np.asarray(module.apply(variables, x.transpose(0, 2, 3, 1), train=False)), expected) < REL_TOL
    backend_or_skip("mxnet")
    from mxnet import np as mnp

    import densenet_mxnet

    net = densenet_mxnet.get_model("densenet121", pretrained=densenet121_pth)
    assert rel_error(net(mnp.array(x)).asnumpy(), expected) < REL_TOL


def test_preprocessing_matches_torchvision_constants():
    torch = pytest.importorskip("torch")
    from densenet_torch import zoo as torch_zoo

    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = torch_zoo.preprocess_input(x)
    assert np.allclose(out[0, :, 0, 0].numpy(), (1 - np.array(zoo.IMAGENET_MEAN)) / np.array(zoo.IMAGENET_STD))


# ---------------------------------------------------------------------------------------
# checkpoints as people save them


def tiny_torch_state(seed=0):
    spec = specs.get_spec("tiny")
    return spec, init_state(spec, seed=seed, randomize_bn=True)


def torch_save(path, obj):
    torch = pytest.importorskip("torch")

    def tensors(value):
        if isinstance(value, np.ndarray):
            return torch.from_numpy(value)
        return {k: tensors(v) for k, v in value.items()} if isinstance(value, dict) else value

    torch.save(tensors(obj), path)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_ddp_and_compile_prefixes_are_removed(tmp_path, capsys, prefix):
    spec, state = tiny_torch_state()
    torch_save(tmp_path / "ddp.pth", {prefix + key: value for key, value in state.items()})
    assert main(["convert", str(tmp_path / "ddp.pth"), str(tmp_path / "c.safetensors")]) == 0
    assert "'module.' prefix (DistributedDataParallel)" in capsys.readouterr().out or prefix == "_orig_mod."
    read_spec, read = zoo.read_weights(tmp_path / "c.safetensors")
    assert read_spec == spec and all(np.array_equal(read[k], state[k]) for k in state)


def test_training_checkpoints_say_which_entry_was_read(tmp_path, capsys):
    import argparse

    spec, state = tiny_torch_state()
    _, ema = tiny_torch_state(seed=1)
    checkpoint = {  # as timm's training script saves one (its arguments as an argparse.Namespace)
        "epoch": 3,
        "arch": "densenet121",
        "args": argparse.Namespace(lr=0.1, model="densenet121"),
        "state_dict": {"module." + key: value for key, value in state.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
        "state_dict_ema": ema,
    }
    torch_save(tmp_path / "model_best.pth.tar", checkpoint)
    assert main(["convert", str(tmp_path / "model_best.pth.tar"), str(tmp_path / "c.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "the state dict is the checkpoint's 'state_dict' entry (also there: state_dict_ema)" in out
    assert np.array_equal(
        zoo.read_weights(tmp_path / "c.safetensors")[1]["classifier.weight"], state["classifier.weight"]
    )
    torch_save(tmp_path / "ema.pth", {"model": ema, "epoch": 1})
    assert zoo.read_file(tmp_path / "ema.pth")[2] == ["the state dict is the checkpoint's 'model' entry"]
    torch_save(tmp_path / "none.pth", {"epoch": 1, "weights": {"a": np.zeros(2)}})
    with pytest.raises(CheckpointError, match=r"none\.pth holds a dict \(epoch, weights\) that is neither"):
        zoo.read_weights(tmp_path / "none.pth")


def test_safetensors_without_our_metadata_takes_arch(tmp_path, capsys):
    from safetensors.numpy import save_file

    spec, state = tiny_torch_state()
    path = tmp_path / "model.safetensors"  # as a model hub stores timm's weights: tensors, no spec
    save_file(state, str(path))
    assert main(["convert", str(path), str(tmp_path / "c.safetensors"), "--arch", "tiny"]) == 0
    assert "no densenet-xf metadata: the architecture is inferred from the tensors" in capsys.readouterr().out
    assert zoo.read_weights(tmp_path / "c.safetensors")[0] == spec
    assert main(["convert", str(path), str(tmp_path / "d.safetensors"), "--arch", "tiny_d2l"]) == 2
    err = capsys.readouterr().err
    assert (
        "is not tiny_d2l: its bn_size is 2, tiny_d2l's is None "
        "(and 3 more field(s): conv_bias, in_channels, num_classes)" in err
    )
    assert err.count("\n") == 1 and "{" not in err  # one line, no JSON specs


def test_arch_and_file_disagree_on_one_field():
    spec = specs.get_spec("densenet121").replace(name="densenet-k32-6-12-24-16", num_classes=10)
    with pytest.raises(CheckpointError, match="its num_classes is 10, densenet121's is 1000; without --arch") as info:
        zoo.check_arch(spec, "densenet121", "timm.pth")
    assert "more field" not in str(info.value)


def test_deep_stem_is_said_in_words(tmp_path):
    spec, state = tiny_torch_state()
    rng = np.random.default_rng(0)
    stem = {  # timm's deep stem: three 3x3 convs with BatchNorm, 3 -> 4 -> 4 -> 8 channels
        "features.conv0.weight": rng.standard_normal((4, 3, 3, 3)),
        "features.conv1.weight": rng.standard_normal((4, 4, 3, 3)),
        "features.conv2.weight": rng.standard_normal((8, 4, 3, 3)),
    }
    for norm, width in (("norm0", 4), ("norm1", 4), ("norm2", 8)):
        stem.update(
            {f"features.{norm}.{leaf}": np.ones(width) for leaf in ("weight", "bias", "running_mean", "running_var")}
        )
    deep = {**{k: v for k, v in state.items() if not k.startswith(("features.conv0", "features.norm0"))}, **stem}
    torch_save(tmp_path / "deep.pth", {k: v.astype(np.float32) for k, v in deep.items()})
    with pytest.raises(CheckpointError, match=r"deep\.pth has a deep stem: 3 convolutions \(3x3, 3x3, 3x3\)"):
        zoo.read_weights(tmp_path / "deep.pth")
    state = dict(state, **{"features.conv0.weight": np.zeros((8, 3, 3, 3), np.float32)})
    with pytest.raises(CheckpointError, match="stem is a 3x3 convolution with BatchNorm; densenet-xf builds"):
        zoo.infer_spec(state, "s.pth")


def test_a_missing_tensor_is_reported_missing():
    _, state = tiny_torch_state()
    del state["features.denseblock1.denselayer2.norm1.weight"]
    with pytest.raises(
        CheckpointError, match=r"1 missing key\(s\): features\.denseblock1\.denselayer2\.norm1\.weight$"
    ):
        zoo.infer_spec(state, "m.pth")


def test_numpy_mode_params_of_our_mxnet_model_read(tmp_path):
    backend = backend_or_skip("mxnet")
    spec, state = tiny_torch_state()
    model = backend.build(spec)
    backend.load_state(model, state)
    model.save_parameters(str(tmp_path / "ours.params"))  # NumPy mode, our structural names
    read_spec, read, notes = zoo.read_file(tmp_path / "ours.params")
    assert read_spec == spec and all(np.array_equal(read[k], state[k]) for k in state)
    assert notes == ["saved in MXNet's NumPy mode with densenet_mxnet's parameter names"]


def test_framework_reasons_are_one_plain_line():
    error = RuntimeError(
        'Traceback (most recent call last):\n  File "x.cc", line 3\n\x1b[91mRuntimeError: bad magic\x1b[0m\n'
    )
    assert zoo.reason(error) == "RuntimeError: bad magic"


# ---------------------------------------------------------------------------------------
# specs in metadata, validated before anything is built


def metadata_file(path, spec_json):
    from safetensors.numpy import save

    path.write_bytes(
        save({"x": np.zeros(1, np.float32)}, metadata={"format": "densenet-xf canonical v1", "spec": spec_json})
    )
    return path


def test_metadata_spec_missing_a_field_or_of_a_wrong_type(tmp_path, capsys):
    import json

    fields = json.loads(specs.get_spec("tiny").to_json())
    del fields["growth_rate"]
    path = metadata_file(tmp_path / "a.safetensors", json.dumps(fields))
    assert main(["convert", str(path), str(tmp_path / "b.pth")]) == 2
    assert "its metadata's spec lacks the field(s): growth_rate" in capsys.readouterr().err
    fields.update(growth_rate="4")
    with pytest.raises(CheckpointError, match="field growth_rate is '4', not an integer"):
        zoo.read_weights(metadata_file(tmp_path / "c.safetensors", json.dumps(fields)))
    with pytest.raises(CheckpointError, match="is not JSON"):
        zoo.read_weights(metadata_file(tmp_path / "d.safetensors", "{"))


def test_a_small_file_claiming_millions_of_layers_fails_fast(tmp_path):
    import time

    spec = specs.get_spec("tiny").replace(block_config=(1_000_000,) * 4)
    path = metadata_file(tmp_path / "huge.safetensors", spec.to_json())
    assert path.stat().st_size < 400
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="claims 4 blocks of 4000000 layers in all; at most"):
        zoo.read_weights(path)
    assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------------------------------------
# writers: every format alike


WRITE_CASES = {  # suffix -> (framework, spec)
    "safetensors": (None, specs.get_spec("tiny")),
    "pth": ("torch", specs.get_spec("tiny")),
    "h5": ("tf", KERAS_SPEC),
    "weights.h5": ("tf", KERAS_SPEC),
    "keras": ("tf", KERAS_SPEC),
    "params": ("mxnet", GLUON_SPEC),
}


def unwritable_folder(tmp_path):
    """A folder no file can be written in: read-only for a user; for root (whom modes do not stop), /sys."""
    import os

    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.mark.parametrize("suffix", list(WRITE_CASES))
def test_writers_create_missing_folders_and_refuse_unwritable_ones(tmp_path, capsys, suffix):
    framework, spec = WRITE_CASES[suffix]
    if framework:
        backend_or_skip(framework)
    src = tmp_path / "src.safetensors"
    save_state(src, init_state(spec, seed=2), spec)
    dst = tmp_path / "new" / "folder" / f"model.{suffix}"
    assert main(["convert", str(src), str(dst)]) == 0
    assert sorted(p.name for p in dst.parent.iterdir()) == [dst.name]  # nothing beside it, no temporary file
    assert zoo.read_weights(dst)[0].replace(name=spec.name) == spec
    capsys.readouterr()
    target = unwritable_folder(tmp_path) / f"model.{suffix}"
    assert main(["convert", str(src), str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"densenet-xf convert: error: cannot write {target}") and err.count("\n") == 1, err
    assert not target.exists()


# ---------------------------------------------------------------------------------------
# quiet messages, as a user sees them in a terminal


def run_cli(*argv):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "conformance", *argv], capture_output=True, text=True, env=env)


@pytest.mark.slow  # two fresh processes that import TensorFlow: about 40 s on 2 busy cores
def test_keras_conversion_prints_no_framework_logs(tmp_path):
    backend_or_skip("tf")
    src = tmp_path / "k.safetensors"
    save_state(src, init_state(KERAS_SPEC), KERAS_SPEC)
    done = run_cli("convert", str(src), str(tmp_path / "k.h5"))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    back = run_cli("convert", str(tmp_path / "k.h5"), str(tmp_path / "back.safetensors"), "--verbose")
    assert back.returncode == 0 and "tensorflow" in back.stderr.lower()  # --verbose shows them


def test_a_damaged_params_file_is_one_plain_line(tmp_path):
    backend_or_skip("mxnet")
    path = tmp_path / "random.params"
    path.write_bytes(np.random.default_rng(0).bytes(300))
    done = run_cli("convert", str(path), str(tmp_path / "x.safetensors"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "\x1b" not in done.stderr, done.stderr
    assert "is not a readable MXNet .params file (truncated or corrupt?): it does not start with" in done.stderr


# ---------------------------------------------------------------------------------------
# Keras files by layer order: the Keras 2 builder's names


KERAS2_NAMES = {"conv1_conv": "conv1/conv", "conv1_bn": "conv1/bn", "predictions": "fc1000"}


def text(name):
    return name.decode() if isinstance(name, bytes) else str(name)


def keras2_file(path, model, renames=KERAS2_NAMES, reshape=None):
    """A legacy .h5 as the Keras 2 builder named its layers (`conv1/conv`, `fc1000`): Keras 3's own
    legacy writer, then the layers renamed in the file with h5py (the published files cannot be
    downloaded here). `reshape` replaces one layer's first weight with a wrongly shaped one."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
        for old, new in renames.items():
            group = f[old]
            weight_names = [text(name) for name in group.attrs["weight_names"]]
            for name in weight_names:  # weights live at LAYER/LAYER/kernel in Keras 2's files
                f.move(f"{old}/{name}", f"{new}/{new}/{name.split('/', 1)[1]}")
            f[new].attrs["weight_names"] = [f"{new}/{name.split('/', 1)[1]}".encode() for name in weight_names]
            del f[old]
        f.attrs["layer_names"] = [renames.get(text(name), text(name)).encode() for name in f.attrs["layer_names"]]
        if reshape:
            group = f[reshape]
            name = text(group.attrs["weight_names"][0])
            shape = group[name].shape
            del group[name]
            group[name] = np.zeros(shape[:-1] + (shape[-1] + 1,), np.float32)


def test_keras2_named_file_reads_by_layer_order(tmp_path, capsys):
    model = keras_zoo_model()
    x = images(32)
    expected = keras_logits(model, x)
    src = tmp_path / "densenet_keras2.h5"
    keras2_file(src, model)
    assert main(["convert", str(src), str(tmp_path / "c.safetensors")]) == 0
    assert "layers matched by order, as Keras loads a legacy .h5: 3 of them" in capsys.readouterr().out
    spec, state = zoo.read_weights(tmp_path / "c.safetensors")
    assert spec == KERAS_SPEC
    assert_every_backend_reproduces(spec, state, x, expected, ("torch",))


def test_keras2_named_file_names_the_first_layer_that_does_not_fit(tmp_path):
    model = keras_zoo_model()
    path = tmp_path / "bad.h5"
    keras2_file(path, model, reshape="conv2_block1_1_conv")
    with pytest.raises(CheckpointError, match=r"bad\.h5: layer 4 with weights, conv2_block1_1_conv, holds") as info:
        zoo.read_weights(path)
    assert "where Keras applications' " in str(info.value)


def test_gluon_model_zoo_works_in_the_same_process_after_densenet_mxnet():
    """densenet_mxnet keeps MXNet's NumPy mode to its own calls: Gluon's own model zoo, in legacy
    NDArray mode, still works after it, and densenet_mxnet still works after that. In a fresh
    process: other tests (the book's MXNet code) turn NumPy mode on for theirs."""
    backend_or_skip("mxnet")
    script = """
import numpy as np
from conformance.backends import load_backend
from conformance.specs import get_spec
from conformance.weights import init_state
backend = load_backend("mxnet")
spec = get_spec("tiny")
model = backend.build(spec)
backend.load_state(model, init_state(spec, seed=0, randomize_bn=True))
x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
before = backend.forward(model, x, train=False)
import mxnet as mx
from mxnet.gluon.model_zoo import vision
assert not mx.util.is_np_array() and not mx.util.is_np_shape()
net = vision.densenet121(pretrained=False)
net.initialize()
out = net(mx.nd.zeros((1, 3, 224, 224)))  # its AvgPool2D(7) needs a 7x7 map
assert isinstance(out, mx.nd.NDArray) and out.shape == (1, 1000)
assert np.array_equal(backend.forward(model, x, train=False), before)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
