"""MXNet-specific behaviour; the shared contract is in test_backends.py."""

import os
import subprocess
import sys
import types

import numpy as onp
import pytest

pytest.importorskip("densenet_mxnet.compat", reason="MXNet is not installed (or cannot be imported here)")

import mxnet as mx  # noqa: E402
from mxnet import autograd, np  # noqa: E402

from conformance import reference, specs, weights  # noqa: E402
from conformance.specs import ARCHS, InputError  # noqa: E402
from conformance.suite import checks  # noqa: E402
from densenet_mxnet import (  # noqa: E402
    DenseBlock,
    DenseNet,
    compat,
    conv_block,
    export_canonical,
    load_canonical,
    transition_block,
    zoo,
)
from densenet_mxnet.backend import Backend  # noqa: E402
from densenet_mxnet.model import NO_MEMORY_EFFICIENT  # noqa: E402
from densenet_mxnet.weights import canonical_key, structural_params  # noqa: E402


def initialized(block):
    block.initialize()
    return block


# --- the d2l chapter's blocks


@pytest.mark.parametrize("hybridize", [False, True])
@mx.util.use_np  # the bare blocks run in NumPy mode, as the book's `npx.set_np()` has it; DenseNet scopes its own
def test_d2l_dense_block_and_transition_shapes(hybridize):
    blk, trans = initialized(DenseBlock(2, 3, 10)), initialized(transition_block(23, 10))
    if hybridize:
        blk.hybridize()
        trans.hybridize()
    Y = blk(np.random.normal(size=(4, 3, 8, 8)))
    assert Y.shape == (4, 23, 8, 8)
    assert trans(Y).shape == (4, 10, 4, 4)


def test_conv_block_is_bn_relu_conv():
    block = conv_block(3, 10)
    assert [type(b).__name__ for b in block] == ["BatchNorm", "Activation", "Conv2D"]
    assert block.conv1._kwargs["pad"] == (1, 1)
    bottleneck = conv_block(3, 10, bn_size=4)
    assert bottleneck.conv1._channels == 40 and bottleneck.conv2._kwargs["kernel"] == (3, 3)


def test_structural_names_are_the_canonical_keys():
    for arch in ("d2l", "densenet121", "densenet40_k12"):
        keys = [canonical_key(name) for name in structural_params(DenseNet(arch))]
        assert keys == list(specs.parameter_table(ARCHS[arch]))


def test_batch_norm_settings_are_explicit():
    bn = DenseNet("tiny").features.norm0
    assert bn._kwargs["eps"] == 1e-5 and bn._kwargs["momentum"] == 0.9


# --- numbers: imperative and hybridized, against the reference and each other


@pytest.mark.parametrize("hybridize, arch, size", [(False, "tiny_d2l", 13), (True, "tiny", 19)])
def test_imperative_and_hybridized_models_match_the_reference(hybridize, arch, size):
    results = checks.compare_with_reference(Backend(hybridize=hybridize), arch, size)
    failures = {
        f"{dtype}/{name}": item
        for dtype, items in results.items()
        for name, item in items.items()
        if not item["passed"]
    }
    assert not failures


def test_hyperparameters_really_are_float32(monkeypatch):
    """MXNet's operators take the learning rate and BatchNorm's momentum as C++ floats: without
    the backend's declaration, its float64 step is off by exactly that rounding."""
    lr32, momentum32 = float(onp.float32(checks.LR)), float(onp.float32(0.9))
    backend = Backend()
    monkeypatch.setattr(backend, "float32_hyperparameters", False)
    results = checks.compare_with_reference(backend, "tiny", 19, dtypes=("float64",))["float64"]
    assert results["sgd_update"]["error"] == pytest.approx(abs(lr32 / checks.LR - 1), rel=1e-3)
    assert results["running_stats_update"]["error"] == pytest.approx(abs((1 - momentum32) / 0.1 - 1), rel=1e-3)


def test_hybridize_gives_the_same_numbers():
    spec = ARCHS["tiny"]
    state = weights.init_state(spec, 3, randomize_bn=True)
    x = onp.random.default_rng(0).standard_normal((2, 3, 19, 19))
    outputs = []
    for hybridize in (False, True):
        backend = Backend(hybridize=hybridize)
        model = backend.build(spec, "float64")
        backend.load_state(model, state)
        outputs.append((backend.forward(model, x, train=False), backend.gradients(model, x, onp.array([1, 2]))[1]))
    (eval_a, grads_a), (eval_b, grads_b) = outputs
    onp.testing.assert_allclose(eval_a, eval_b, rtol=1e-13, atol=1e-13)
    for key in grads_a:
        onp.testing.assert_allclose(grads_a[key], grads_b[key], rtol=1e-10, atol=1e-12, err_msg=key)


def test_running_statistics_move_in_the_backward_pass():
    """On the CPU, MXNet's BatchNorm folds batch statistics into the running ones when it
    computes gradients, not in the train-mode forward pass (PyTorch, Keras, Flax do the latter)."""
    backend, spec = Backend(), ARCHS["tiny"]
    model = backend.build(spec)
    backend.load_state(model, weights.init_state(spec))
    x = onp.random.default_rng(0).standard_normal((2, 3, 19, 19)).astype("float32")
    backend.forward(model, x, train=True)
    assert export_canonical(model)["features.norm0.running_var"].tolist() == [1.0] * 8
    backend.gradients(model, x, onp.array([0, 1]))
    assert export_canonical(model)["features.norm0.running_var"].tolist() != [1.0] * 8


def test_first_momentum_buffer_is_the_gradient_in_pytorch_convention():
    backend, spec = Backend(), ARCHS["tiny_d2l"]
    state = weights.init_state(spec, 1)
    x = onp.random.default_rng(2).standard_normal((4, 1, 13, 13))
    y = onp.array([0, 1, 2, 3])
    model = backend.build(spec, "float64")
    backend.load_state(model, state)
    _, grads = backend.gradients(model, x, y)
    backend.load_state(model, state)
    trainer = backend.make_trainer(model, lr=0.1, momentum=0.9)
    trainer.train_step(x, y)
    buffers = trainer.export_optimizer_state()
    for key, grad in grads.items():
        onp.testing.assert_allclose(buffers[key], grad, rtol=1e-6, atol=1e-12, err_msg=key)


# --- loading, validation, dropout


def test_checkpoint_loads_into_an_uninitialized_float64_model():
    spec = ARCHS["tiny_d2l"]
    state = weights.init_state(spec, seed=2, randomize_bn=True)
    model = DenseNet(spec)
    model.cast("float64")
    load_canonical(model, state)
    assert export_canonical(model)["features.conv0.weight"].dtype == onp.float64
    x = onp.random.default_rng(0).standard_normal((2, 1, 13, 13))
    with autograd.predict_mode():
        logits = model(np.array(x, dtype="float64")).asnumpy()
    onp.testing.assert_allclose(logits, reference.forward(spec, state, x), rtol=1e-12, atol=1e-12)


def test_load_torchvision_style_state_with_batch_counters():
    model = initialized(DenseNet("tiny"))
    state = weights.init_state(ARCHS["tiny"], randomize_bn=True)
    load_canonical(model, {**state, "features.norm0.num_batches_tracked": onp.array(3)})
    assert export_canonical(model)["features.norm0.weight"].tobytes() == state["features.norm0.weight"].tobytes()


@pytest.mark.parametrize("hybridize", [False, True])
def test_block_call_validates_input(hybridize):
    model = initialized(DenseNet("d2l"))
    if hybridize:
        model.hybridize()
    with pytest.raises(InputError, match="too small for d2l.*29x29"):
        model(np.zeros((1, 1, 28, 28)))
    with pytest.raises(InputError, match="looks like NHWC"):
        model(np.zeros((1, 96, 96, 1)))
    model.cast("float64")
    with pytest.raises(InputError, match="expects float64 input, got float32"):
        model(np.zeros((1, 1, 96, 96)))


def test_dropout_is_active_only_in_training():
    model = initialized(DenseNet(ARCHS["tiny"].replace(drop_rate=0.5)))
    x = np.random.normal(size=(2, 3, 19, 19))
    assert (model(x) == model(x)).all()
    with autograd.train_mode():
        mx.random.seed(0)
        a = model(x)
        mx.random.seed(1)
        assert not (a == model(x)).all()


# --- memory_efficient: accepted, says it does nothing, computes the plain numbers


def memory_efficient_build(backend, spec, dtype="float32"):
    with pytest.warns(UserWarning, match="no effect in MXNet 1.9"):
        return backend.build(spec, dtype, memory_efficient=True)


@pytest.mark.parametrize("arch, size", [("tiny", 19), ("tiny_d2l", 13)])
def test_memory_efficient_model_matches_the_reference(arch, size):
    with pytest.warns(UserWarning, match="no effect in MXNet 1.9"):
        results = checks.compare_with_reference(Backend(), arch, size, memory_efficient=True)
    assert set(results) == {"float32", "float64"} and checks.all_passed(results)


def test_memory_efficient_model_says_it_has_no_mechanism():
    """What the benchmark and the report read: MXNet 1.9's mirroring never reaches Gluon."""
    backend = Backend()
    model = memory_efficient_build(backend, ARCHS["tiny"])
    assert model.memory_efficient and model.memory_efficient_unsupported == NO_MEMORY_EFFICIENT
    assert not backend.build(ARCHS["tiny"]).memory_efficient_unsupported
    assert "docs/memory.md" in NO_MEMORY_EFFICIENT


def test_memory_efficient_model_loads_the_same_checkpoint():
    backend, spec = Backend(), ARCHS["tiny"].replace(drop_rate=0.2)
    state = weights.init_state(spec, 4, randomize_bn=True)
    x = onp.random.default_rng(0).standard_normal((2, 3, 19, 19))
    y = onp.array([1, 3])
    outputs = []
    for model in (backend.build(spec, "float64"), memory_efficient_build(backend, spec, "float64")):
        backend.load_state(model, state)
        assert backend.count_params(model) == backend.count_params(backend.build(spec))
        assert export_canonical(model).keys() == state.keys()
        mx.random.seed(7)  # dropout: the same mask in both
        train_logits = backend.forward(model, x, train=True)
        mx.random.seed(7)
        outputs.append((backend.forward(model, x, train=False), train_logits, backend.gradients(model, x, y)[1]))
    (eval_a, train_a, grads_a), (eval_b, train_b, grads_b) = outputs
    assert eval_a.tobytes() == eval_b.tobytes() and train_a.tobytes() == train_b.tobytes()
    assert all(grads_a[key].tobytes() == grads_b[key].tobytes() for key in grads_a)


def test_zoo_constructors_accept_memory_efficient():
    with pytest.warns(UserWarning, match="no effect in MXNet 1.9"):
        model = zoo.densenet121(classes=10, memory_efficient=True)
    assert model.memory_efficient and model.classifier.weight.shape == (10, 1024)


# --- the compatibility module


def test_numpy_2_names_are_restored_for_mxnet():
    assert onp.isnan(onp.NaN) and onp.NINF == -onp.inf and onp.PZERO == 0.0
    assert onp.product([2, 3]) == 6 and onp.alltrue([True]) and onp.sometrue([False, True])
    assert onp.in1d([[1, 5], [2, 7]], [5, 7]).tolist() == [False, True, False, True]
    assert onp.msort(onp.array([[3, 1], [2, 4]])).tolist() == [[2, 1], [3, 4]]
    with pytest.raises(NotImplementedError, match="numpy_financial"):
        onp.pmt(0.05, 10, 1000)


def test_restoring_leaves_existing_names_alone():
    module = types.SimpleNamespace(NaN="kept")
    restored = compat.restore_numpy_names(module)
    assert module.NaN == "kept" and "NaN" not in restored
    assert set(restored) == set(compat.NUMPY_1_NAMES) - {"NaN"}


def test_onednn_is_on_unless_the_user_turns_it_off():
    env = {k: v for k, v in os.environ.items() if k != "MXNET_MKLDNN_ENABLED"}
    code = "import os, densenet_mxnet; print(os.environ['MXNET_MKLDNN_ENABLED'])"
    for setting, expected in ((None, "1"), ("0", "0")):
        run_env = env if setting is None else {**env, "MXNET_MKLDNN_ENABLED": setting}
        result = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True)
        assert result.stdout.split()[-1] == expected, result.stderr[-2000:]


def test_onednn_concatenates_inputs_narrower_than_its_block_size():
    """MXNet issue 19586: oneDNN's concat failed on a first input of under 8 channels."""
    spec = specs.get_spec("tiny").replace(name="narrow", stem="cifar", num_init_features=1, growth_rate=3)
    assert checks.all_passed(checks.compare_with_reference(Backend(), spec, 12, 2, 0, ("float32", "float64")))


def test_a_python_without_distutils_gets_a_clear_error(monkeypatch):
    monkeypatch.setattr(compat.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="install setuptools") as error:
        compat.check_distutils()
    assert error.value.name == "distutils"  # so load_backend reports the backend unavailable, not broken


def test_importing_keeps_torch_thread_count():
    """Loading libmxnet drops a default torch thread count to 1 (measured: 2 -> 1 on 2 cores);
    compat records torch's count before and sets it again after."""
    pytest.importorskip("torch", reason="PyTorch is not installed")
    code = "import torch; n = torch.get_num_threads(); import densenet_mxnet; print(n, torch.get_num_threads())"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    before, after = out.stdout.split()[-2:]
    if before == "1":
        pytest.skip("torch runs one thread here anyway")
    assert after == before


def test_torch_threads_are_restored_only_when_torch_was_there(monkeypatch):
    calls = []
    fake_torch = types.SimpleNamespace(get_num_threads=lambda: 4, set_num_threads=calls.append)
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    compat.restore_torch_threads(compat.torch_threads())
    compat.restore_torch_threads(None)
    assert calls == [4]


# --- devices


def test_gpu_that_cannot_run_falls_back_to_the_cpu(monkeypatch):
    monkeypatch.setattr(mx.context, "num_gpus", lambda: 1)  # a GPU MXNet sees but has no kernels for
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "1")
    backend = Backend("gpu")
    assert backend.context == mx.cpu() and backend.device_name == "cpu"
    assert "cannot run on gpu(0)" in backend.device_note and "ran on the CPU" in backend.device_note
    assert os.environ["NVIDIA_TF32_OVERRIDE"] == "0"
    model = backend.build(ARCHS["tiny"])
    assert backend.forward(model, onp.zeros((1, 3, 19, 19), "float32"), train=False).shape == (1, 5)


def test_no_gpu_is_explained(monkeypatch):
    monkeypatch.setattr(mx.context, "num_gpus", lambda: 0)
    backend = Backend("gpu")
    assert backend.context == mx.cpu() and "sees no GPU" in backend.device_note
