"""TensorFlow/Keras-specific behaviour; the shared contract is in test_backends.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="TensorFlow is not installed")
pytest.importorskip("keras", reason="Keras is not installed")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from conformance import reference, specs, weights  # noqa: E402
from conformance.specs import ARCHS, InputError  # noqa: E402
from conformance.suite import checks  # noqa: E402
from densenet_tf import DenseBlock, DenseNet, conv_block, export_canonical, load_canonical, transition_block  # noqa: E402
from densenet_tf.backend import Backend  # noqa: E402
from densenet_tf.model import MemoryEfficientDenseBlock  # noqa: E402
from densenet_tf.train import Trainer, gradient_step, train_pass  # noqa: E402
from densenet_tf.weights import canonical_variables  # noqa: E402
from densenet_tf.zoo import DenseNet121  # noqa: E402


def batch(spec, size, n=4, seed=0, dtype=np.float32):
    """An NCHW batch for the reference, the same batch in NHWC, and labels."""
    x, y = checks.make_batch(spec, size, n, seed)
    return x.astype(dtype), specs.to_layout(x, "NHWC").astype(dtype), y


def test_d2l_dense_block_and_transition_shapes():
    Y = DenseBlock(2, 10)(tf.random.normal((4, 8, 8, 3)))
    assert Y.shape == (4, 8, 8, 23)
    assert transition_block(10)(Y).shape == (4, 4, 4, 10)


def test_conv_block_is_bn_relu_conv():
    block = conv_block(10)
    assert [type(layer).__name__ for layer in block.layers] == ["BatchNormalization", "ReLU", "Conv2D"]
    conv = block.get_layer("conv1")
    assert conv.kernel_size == (3, 3) and conv.strides == (1, 1) and conv.padding == "same"
    bottleneck = conv_block(10, bn_size=4)
    assert bottleneck.get_layer("conv1").filters == 40 and bottleneck.get_layer("conv2").kernel_size == (3, 3)


def test_model_is_built_without_a_dummy_call():
    model = DenseNet("tiny_d2l")
    assert model.built and all(layer.built for layer in model.features.layers)
    assert len(model.weights) == len(specs.parameter_table(ARCHS["tiny_d2l"]))
    load_canonical(model, weights.init_state(ARCHS["tiny_d2l"]))  # no call before loading


def test_variable_paths_map_to_the_canonical_keys_in_order():
    for arch in ("d2l", "densenet121", "densenet40_k12"):
        assert list(canonical_variables(DenseNet(arch))) == list(specs.parameter_table(ARCHS[arch]))


def test_summary_shows_readable_layer_names():
    lines = []
    DenseNet("tiny").summary(line_length=120, expand_nested=True, print_fn=lambda line, **kwargs: lines.append(line))
    text = "\n".join(lines)
    for name in (
        "conv0_pad",
        "conv0",
        "norm0",
        "relu0",
        "pool0",
        "denseblock1",
        "transition1",
        "norm",
        "denseblock2",
        "norm5",
        "classifier",
    ):
        assert f"{name} (" in text, name
    for generated in ("sequential", "conv2d", "batch_normalization", "dense_block"):
        assert generated not in text, generated


def test_batch_norm_settings_are_explicit():
    model = DenseNet("tiny")
    norms = [
        model.features.get_layer("norm0"),
        model.features.get_layer("norm5"),
        model.features.get_layer("denseblock1").blks[0].get_layer("norm2"),
        model.features.get_layer("transition1").get_layer("norm"),
    ]
    for bn in norms:
        assert bn.epsilon == 1e-5 and bn.momentum == 0.9 and bn.axis in (-1, 3)


def test_stride_2_layers_are_padded_explicitly_and_symmetrically():
    features = DenseNet("tiny").features
    assert features.get_layer("conv0_pad").padding == ((3, 3), (3, 3))
    assert features.get_layer("pool0_pad").padding == ((1, 1), (1, 1))
    for name in ("conv0", "pool0"):
        assert features.get_layer(name).strides == (2, 2) and features.get_layer(name).padding == "valid"


@pytest.mark.parametrize("run_eagerly", [True, False], ids=["eager", "tf.function"])
def test_forward_and_gradients_match_the_reference(run_eagerly):
    """Eval and train forward, all gradients and one SGD step with running statistics, float32
    and float64, on an even input size (where 'same' padding on a stride-2 layer would shift)."""
    results = checks.compare_with_reference(Backend(run_eagerly=run_eagerly), "tiny", 20, 4)
    failures = {
        f"{dtype}/{name}": item
        for dtype, items in results.items()
        for name, item in items.items()
        if not item["passed"]
    }
    assert not failures


@pytest.mark.parametrize("run_eagerly", [True, False], ids=["eager", "tf.function"])
def test_sgd_step_matches_the_reference_in_float64(run_eagerly):
    spec = ARCHS["tiny_d2l"]
    state = weights.init_state(spec, seed=3, randomize_bn=True)
    x, x_nhwc, y = batch(spec, 13, dtype=np.float64)
    model = DenseNet(spec, dtype="float64")
    load_canonical(model, state)
    loss, _ = Trainer(model, lr=0.1, run_eagerly=run_eagerly).train_step(x_nhwc, y)
    expected, expected_loss = reference.sgd_step(spec, state, x, y, lr=0.1, running_var="biased")
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    new = export_canonical(model)
    for key, value in expected.items():
        np.testing.assert_allclose(new[key], value, rtol=0, atol=1e-12 * max(1.0, np.abs(value).max()), err_msg=key)


def test_exported_momentum_follows_pytorchs_convention():
    """After one step from zero, PyTorch's buffer is the gradient (Keras' own is -lr times it)."""
    spec = ARCHS["tiny_d2l"]
    state = weights.init_state(spec, seed=1)
    _, x, y = batch(spec, 13, dtype=np.float64)
    model = DenseNet(spec, dtype="float64")
    load_canonical(model, state)
    _, _, grads = train_pass(model, x, y)
    load_canonical(model, state)
    trainer = Trainer(model, lr=0.1, momentum=0.9)
    trainer.train_step(x, y)
    momentum = trainer.export_optimizer_state()
    for key, grad in grads.items():
        np.testing.assert_allclose(momentum[key], grad, rtol=1e-12, atol=1e-15, err_msg=key)


def test_module_call_validates_input():
    model = DenseNet("d2l")
    with pytest.raises(InputError, match="too small for d2l.*29x29"):
        model(np.zeros((1, 28, 28, 1), np.float32))
    with pytest.raises(InputError, match="looks like NCHW"):
        model(np.zeros((1, 1, 96, 96), np.float32))
    with pytest.raises(InputError, match="expects float32 input, got float64"):
        model(np.zeros((1, 96, 96, 1)))  # Keras would cast it silently; the model does not
    with pytest.raises(InputError, match="expects float64 input, got float32"):
        DenseNet("tiny_d2l", dtype="float64")(np.zeros((1, 13, 13, 1), np.float32))


def test_bad_input_inside_tf_function_is_still_an_input_error():
    model = DenseNet("tiny_d2l")
    trainer = Trainer(model, lr=0.1)
    with pytest.raises(InputError, match="rank 3"):
        trainer.train_step(np.zeros((13, 13, 1), np.float32), np.zeros(1, np.int64))


def test_float64_model_computes_in_float64():
    model = DenseNet("tiny_d2l", dtype="float64")
    assert {v.dtype for v in model.weights} == {"float64"}
    assert model(np.zeros((2, 13, 13, 1)), training=True).dtype == tf.float64


def test_training_flag_reaches_batch_norm():
    """Keras BatchNormalization uses running statistics unless training=True reaches it."""
    spec = ARCHS["tiny_d2l"]
    state = weights.init_state(spec, seed=4, randomize_bn=True)
    x, x_nhwc, _ = batch(spec, 13)
    model = DenseNet(spec)
    load_canonical(model, state)
    np.testing.assert_allclose(model(x_nhwc), reference.forward(spec, state, x, train=False), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        model(x_nhwc, training=True), reference.forward(spec, state, x, train=True), rtol=1e-4, atol=1e-5
    )


def test_load_torchvision_style_state_dict_with_batch_counters():
    model = DenseNet("tiny")
    state = weights.init_state(ARCHS["tiny"], randomize_bn=True)
    load_canonical(model, {**state, "features.norm0.num_batches_tracked": np.array(3)})
    assert export_canonical(model)["features.norm0.weight"].tobytes() == state["features.norm0.weight"].tobytes()


def test_dropout_is_active_only_in_training():
    model = DenseNet(ARCHS["tiny"].replace(drop_rate=0.5))
    x = tf.random.normal((2, 19, 19, 3))
    np.testing.assert_array_equal(model(x, training=False), model(x, training=False))
    assert not np.array_equal(model(x, training=True), model(x, training=True))


def test_gpu_request_without_a_gpu_falls_back_to_the_cpu_with_a_note():
    if tf.config.get_visible_devices("GPU"):
        pytest.skip("this machine has a GPU that TensorFlow can use")
    backend = Backend("gpu")
    assert backend.device_name == "cpu" and "no GPU" in backend.device_note


def test_a_fast_trainer_leaves_exact_arithmetic_for_the_checks():
    backend, spec = Backend(), ARCHS["tiny_d2l"]
    x, y = checks.make_batch(spec, 13, 2, 0)
    for precision in ("tf32", "bf16"):
        trainer = backend.make_trainer(backend.build(spec), 0.1, precision=precision)
        trainer.train_step(x.transpose(0, 2, 3, 1), y)
    assert not tf.config.experimental.tensor_float_32_execution_enabled()
    assert checks.all_passed(checks.compare_with_reference(backend, spec, 13, 2, 0, ("float32",)))


@pytest.mark.parametrize("arch, size, run_eagerly", [("tiny", 19, False), ("tiny_d2l", 13, True)])
def test_memory_efficient_model_matches_the_reference(arch, size, run_eagerly):
    """Forward, gradients, SGD step and running statistics moved once (not twice by the
    recomputation), float32 and float64."""
    results = checks.compare_with_reference(Backend(run_eagerly=run_eagerly), arch, size, memory_efficient=True)
    failures = {
        f"{dtype}/{name}": item
        for dtype, items in results.items()
        for name, item in items.items()
        if not item["passed"]
    }
    assert not failures


def plain_and_memory_efficient(spec, dtype="float32"):
    """Two models with the same canonical state and the same dropout seeds."""
    state = weights.init_state(spec, seed=5, randomize_bn=True)
    models = []
    for memory_efficient in (False, True):
        keras.utils.set_random_seed(7)  # Keras draws each Dropout's seed at construction
        models.append(DenseNet(spec, dtype=dtype, memory_efficient=memory_efficient))
        load_canonical(models[-1], state)
    return models


def test_memory_efficient_model_loads_the_same_checkpoint():
    plain, efficient = plain_and_memory_efficient(ARCHS["tiny"])
    assert list(canonical_variables(plain)) == list(canonical_variables(efficient))
    assert Backend().count_params(plain) == Backend().count_params(efficient)
    x = batch(ARCHS["tiny"], 19)[1]
    np.testing.assert_array_equal(plain(x, training=False), efficient(x, training=False))
    assert DenseNet.from_config(efficient.get_config()).memory_efficient


def test_memory_efficient_dropout_draws_the_same_masks():
    spec = ARCHS["tiny"].replace(drop_rate=0.5)
    _, x, y = batch(spec, 19, dtype=np.float64)
    (logits, loss, grads), (logits_me, loss_me, grads_me) = (
        gradient_step(model, x, tf.constant(y, tf.int32)) for model in plain_and_memory_efficient(spec, "float64")
    )
    np.testing.assert_allclose(logits_me, logits, rtol=1e-12, atol=1e-12)
    for grad, grad_me in zip(grads, grads_me):
        np.testing.assert_allclose(grad_me, grad, rtol=1e-10, atol=1e-12)


def test_memory_efficient_model_trains_in_keras_fit():
    """model.fit's own tf.function step: the same weights and running statistics as plain."""
    spec = ARCHS["tiny_d2l"]
    _, x, y = batch(spec, 13, n=8)
    states = []
    for model in plain_and_memory_efficient(spec):
        model.compile(
            optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        states.append(export_canonical(model))
    for key, value in states[0].items():
        np.testing.assert_allclose(states[1][key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def allocator_peaks(arch, size, n):
    """{memory_efficient: peak bytes TensorFlow's CPU allocator held during one eager
    forward-backward}; needs TF_CPU_ALLOCATOR_USE_BFC=true before TensorFlow starts."""
    x, y = checks.make_batch(ARCHS[arch], size, n, 0)
    peaks = {}
    for memory_efficient in (False, True):
        model = DenseNet(arch, memory_efficient=memory_efficient)
        tf.config.experimental.reset_memory_stats("CPU:0")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        train_pass(model, specs.to_layout(x, "NHWC"), y)
        peaks[memory_efficient] = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    return peaks


def test_memory_efficient_model_holds_less_activation_memory():
    """The recomputation is really on: a deep net's forward-backward peak, measured by TensorFlow's
    own allocator in a fresh process, is well under the plain model's (about 40% measured)."""
    code = "import json, test_tf; print(json.dumps(test_tf.allocator_peaks('densenet_bc100_k12', 32, 8)))"
    tests = Path(__file__).parent
    env = {
        **os.environ,
        "TF_CPU_ALLOCATOR_USE_BFC": "true",
        "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    peaks = json.loads(run.stdout.strip().splitlines()[-1])
    assert peaks["true"] < 0.7 * peaks["false"], peaks


def test_zoo_constructor_builds_a_memory_efficient_model():
    model = DenseNet121(memory_efficient=True)
    blocks = [layer for layer in model.features.layers if isinstance(layer, DenseBlock)]
    assert len(blocks) == 4 and all(isinstance(block, MemoryEfficientDenseBlock) for block in blocks)
    assert Backend().count_params(model)[0] == 7_978_856  # torchvision's densenet121
