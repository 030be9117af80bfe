"""JAX/Flax-specific behaviour; the shared contract is in test_backends.py."""

from functools import partial

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed")
pytest.importorskip("flax", reason="Flax is not installed")
pytest.importorskip("optax", reason="optax is not installed")

import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402

from conformance import specs, weights  # noqa: E402
from conformance.backends import load_backend  # noqa: E402
from conformance.specs import ARCHS, InputError  # noqa: E402
from densenet_jax import ConvBlock, DenseBlock, DenseNet, TransitionBlock, export_canonical, load_canonical  # noqa: E402
from densenet_jax.model import BN_EPS, BN_MOMENTUM, batch_norm, conv, variable_shapes  # noqa: E402
from densenet_jax.weights import canonical_key  # noqa: E402

KEY = jax.random.key(0)


def test_d2l_dense_block_and_transition_shapes():
    Y, _ = DenseBlock(2, 10).init_with_output(KEY, jnp.ones((4, 8, 8, 3)), train=False)
    assert Y.shape == (4, 8, 8, 23)
    assert TransitionBlock(10).init_with_output(KEY, Y, train=False)[0].shape == (4, 4, 4, 10)


def test_d2l_net_has_the_book_s_parameter_count_not_its_jax_version_s():
    # The d2l book's Flax version forgets to carry channels across blocks: 700,586.
    params = variable_shapes(DenseNet(ARCHS["d2l"]))["params"]
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == 758_226


def called_layers(module, x):
    """(name, class) of every submodule `module.init` calls, in call order."""
    calls = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.name is not None:  # not the block itself
            calls.append((context.module.name, type(context.module).__name__))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        variables = module.init(KEY, x, train=False)
    return calls, variables


def test_conv_block_is_bn_relu_conv_with_explicit_padding():
    x = jnp.ones((1, 8, 8, 3))
    calls, variables = called_layers(ConvBlock(10), x)
    assert calls == [("norm1", "BatchNorm"), ("conv1", "Conv")]
    assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 3, 10)
    # BatchNorm is the identity at its initial statistics: only the ReLU can zero a negative input.
    assert not ConvBlock(10).apply(variables, -x, train=False).any()
    calls, variables = called_layers(ConvBlock(10, bn_size=4), x)
    assert [name for name, _ in calls] == ["norm1", "conv1", "norm2", "conv2"]
    assert variables["params"]["conv1"]["kernel"].shape == (1, 1, 3, 40)
    assert variables["params"]["conv2"]["kernel"].shape == (3, 3, 40, 10)
    assert conv(64, 7, False, stride=2, name="conv0").padding == ((3, 3), (3, 3))
    assert conv(10, 3, True, name="conv1").padding == ((1, 1), (1, 1))


def test_variables_are_where_a_flax_user_expects_them():
    variables = variable_shapes(DenseNet(ARCHS["tiny"]))
    assert set(variables) == {"params", "batch_stats"}
    layer = variables["params"]["denseblock1"]["denselayer1"]
    assert set(layer["norm1"]) == {"scale", "bias"} and layer["conv1"]["kernel"].shape == (1, 1, 8, 8)  # HWIO
    assert set(variables["batch_stats"]["denseblock1"]["denselayer1"]["norm1"]) == {"mean", "var"}
    assert variables["params"]["classifier"]["kernel"].shape == (16, 5)  # (in, out)


@pytest.mark.parametrize("arch", ["d2l", "densenet121", "densenet40_k12"])
def test_variable_paths_spell_the_canonical_keys(arch):
    paths = flatten_dict(variable_shapes(DenseNet(ARCHS[arch])))
    assert sorted(canonical_key(path) for path in paths) == sorted(specs.parameter_table(ARCHS[arch]))


def test_batch_norm_settings_are_explicit():
    bn = batch_norm(True, jnp.float32, "norm0")
    assert (bn.epsilon, bn.momentum, bn.use_running_average) == (1e-5, 0.9, False)
    assert (BN_EPS, BN_MOMENTUM) == (1e-5, 0.9)
    assert batch_norm(False, jnp.float32, "norm0").use_running_average


def test_load_torchvision_style_state_dict_with_batch_counters():
    spec = ARCHS["tiny"]
    state = weights.init_state(spec, randomize_bn=True)
    variables = load_canonical(DenseNet(spec), {**state, "features.norm0.num_batches_tracked": np.array(3)})
    assert (
        np.asarray(variables["batch_stats"]["norm0"]["var"]).tobytes() == state["features.norm0.running_var"].tobytes()
    )
    assert export_canonical(variables)["features.conv0.weight"].tobytes() == state["features.conv0.weight"].tobytes()


def test_module_call_validates_input():
    model = DenseNet(ARCHS["d2l"])
    with pytest.raises(InputError, match="too small for d2l.*29x29"):
        jax.eval_shape(lambda x: model.init(KEY, x, train=False), jnp.zeros((1, 28, 28, 1), jnp.float32))
    with pytest.raises(InputError, match="looks like NCHW"):
        jax.eval_shape(lambda x: model.init(KEY, x, train=False), jnp.zeros((1, 1, 96, 96), jnp.float32))


def test_float64_models_do_not_turn_float32_ones_into_float64():
    backend = load_backend("jax")
    spec = ARCHS["tiny_d2l"]
    backend.build(spec, "float64")  # switches jax_enable_x64 on for the whole process
    assert jax.config.jax_enable_x64
    model = backend.build(spec, "float32")
    x = specs.to_layout(np.random.default_rng(0).standard_normal((4, 1, 13, 13)).astype(np.float32), "NHWC")
    with pytest.raises(InputError, match="expects float32 input, got float64"):
        backend.forward(model, x.astype(np.float64), train=False)
    trainer = backend.make_trainer(model, lr=0.1, momentum=0.9)
    trainer.train_step(x, np.arange(4))
    assert trainer.predict(x).dtype == np.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(model.variables)} == {jnp.dtype("float32")}
    assert {value.dtype for value in trainer.export_optimizer_state().values()} == {np.dtype("float32")}
    assert {value.dtype for value in backend.gradients(model, x, np.arange(4))[1].values()} == {np.dtype("float32")}


def test_optax_momentum_is_pytorch_s_convention():
    """buf = m * buf + g; p -= lr * buf, checked in float64 against gradients taken separately."""
    backend = load_backend("jax")
    spec = ARCHS["tiny_d2l"]
    rng = np.random.default_rng(0)
    (x1, x2), y = rng.standard_normal((2, 4, 13, 13, 1)), rng.integers(0, 10, 4)
    probe, model = backend.build(spec, "float64"), backend.build(spec, "float64")
    trainer = backend.make_trainer(model, lr=0.1, momentum=0.9)
    g1 = backend.gradients(probe, x1, y)[1]
    trainer.train_step(x1, y)
    before = backend.export_state(model)
    backend.load_state(probe, before)
    g2 = backend.gradients(probe, x2, y)[1]
    trainer.train_step(x2, y)
    after, buffers = backend.export_state(model), trainer.export_optimizer_state()
    for key in g1:
        np.testing.assert_allclose(buffers[key], 0.9 * g1[key] + g2[key], rtol=1e-9, atol=1e-12, err_msg=key)
        np.testing.assert_allclose(after[key] - before[key], -0.1 * buffers[key], rtol=1e-9, atol=1e-12, err_msg=key)


def test_train_step_compiles_once():
    from densenet_jax.train import train_step

    backend = load_backend("jax")
    model = backend.build(ARCHS["tiny_d2l"])
    trainer = backend.make_trainer(model, lr=0.1, momentum=0.9)
    x = np.zeros((2, 13, 13, 1), np.float32)
    trainer.train_step(x, np.arange(2))
    compiled = train_step._cache_size()
    for _ in range(3):
        trainer.train_step(x, np.arange(2))
    assert train_step._cache_size() == compiled


def test_dropout_is_active_only_in_training():
    spec = ARCHS["tiny"].replace(drop_rate=0.5)
    model = DenseNet(spec)
    variables = load_canonical(model, weights.init_state(spec))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 19, 19, 3)), jnp.float32)
    assert np.array_equal(model.apply(variables, x, train=False), model.apply(variables, x, train=False))

    def train(seed):
        return model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(seed)})[0]

    assert np.array_equal(train(0), train(0)) and not np.array_equal(train(0), train(1))


def test_gpu_request_falls_back_to_the_cpu_with_a_reason():
    backend = load_backend("jax", "gpu")
    assert jax.config.jax_default_matmul_precision == "highest"
    if backend.device.platform == "cpu":
        assert "no GPU" in backend.device_note and backend.device_name == "cpu"
    else:
        assert backend.device_note == "" and backend.device_name.startswith("gpu:")


def test_a_fast_trainer_leaves_exact_arithmetic_for_the_checks():
    import jax

    from conformance.suite import checks

    backend, spec = load_backend("jax"), ARCHS["tiny_d2l"]
    x, y = checks.make_batch(spec, 13, 2, 0)
    trainer = backend.make_trainer(backend.build(spec), 0.1, precision="bf16")
    assert trainer.state.apply_fn.__self__.dtype == jnp.bfloat16
    trainer.train_step(x.transpose(0, 2, 3, 1), y)
    assert jax.config.jax_default_matmul_precision == "highest"
    assert jax.tree.leaves(trainer.model.variables)[0].dtype == jnp.float32  # float32 parameters


# Memory-efficient model: nn.remat of each dense layer with the dots policy.


def deep_block_spec():
    return ARCHS["tiny"].replace(block_config=(12,))  # one block deep enough for its quadratic memory


def residual_bytes(spec, memory_efficient, batch=8, size=48):
    """Bytes jax.vjp keeps for the backward pass of a train-mode forward: the leaves of the
    function it returns, traced by eval_shape (nothing is computed or compiled)."""
    model = DenseNet(spec, memory_efficient=memory_efficient)
    variables = variable_shapes(model)
    x = jax.ShapeDtypeStruct((batch, size, size, spec.in_channels), jnp.float32)

    def residuals(variables, x):
        def logits(params):
            return model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])[0]

        return jax.vjp(logits, variables["params"])[1]

    kept = jax.tree.leaves(jax.eval_shape(residuals, variables, x))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in kept)


@pytest.mark.parametrize("arch, size", [("tiny", 19), ("tiny_d2l", 13)])
def test_memory_efficient_model_matches_the_reference(arch, size):
    from conformance.suite import checks

    results = checks.compare_with_reference(load_backend("jax"), arch, size, memory_efficient=True)
    failures = {
        f"{dtype}/{name}": item
        for dtype, items in results.items()
        for name, item in items.items()
        if not item["passed"]
    }
    assert set(results) == {"float32", "float64"} and not failures


def test_memory_efficient_model_keeps_the_variables_and_the_numbers():
    backend, spec = load_backend("jax"), ARCHS["tiny"]
    state = weights.init_state(spec, randomize_bn=True)
    plain, efficient = backend.build(spec), backend.build(spec, memory_efficient=True)
    assert efficient.module.memory_efficient and not plain.module.memory_efficient
    for model in (plain, efficient):
        backend.load_state(model, state)
    assert backend.count_params(efficient) == backend.count_params(plain)
    assert backend.export_state(efficient).keys() == state.keys()
    x = specs.to_layout(np.random.default_rng(0).standard_normal((2, 3, 19, 19)).astype(np.float32), "NHWC")
    np.testing.assert_allclose(
        backend.forward(efficient, x, train=False), backend.forward(plain, x, train=False), rtol=1e-6, atol=1e-6
    )


@partial(jax.jit, static_argnums=0)
def train_logits_and_gradients(module, variables, x, dropout_key):
    def loss(params):
        logits, _ = module.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key}
        )
        return (logits**2).sum(), logits

    gradients, logits = jax.grad(loss, has_aux=True)(variables["params"])
    return logits, gradients


def test_memory_efficient_dropout_draws_the_plain_model_s_masks():
    spec = ARCHS["tiny"].replace(drop_rate=0.5)
    variables = load_canonical(DenseNet(spec), weights.init_state(spec, randomize_bn=True))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 19, 19, 3)), jnp.float32)
    plain, efficient = DenseNet(spec), DenseNet(spec, memory_efficient=True)
    logits, gradients = train_logits_and_gradients(plain, variables, x, KEY)
    assert not np.array_equal(train_logits_and_gradients(plain, variables, x, jax.random.key(1))[0], logits)
    efficient_logits, efficient_gradients = train_logits_and_gradients(efficient, variables, x, KEY)
    assert np.array_equal(efficient_logits, logits)
    for path, gradient in flatten_dict(gradients).items():
        np.testing.assert_allclose(
            flatten_dict(efficient_gradients)[path], gradient, rtol=1e-5, atol=1e-6, err_msg=str(path)
        )


def test_memory_efficient_model_keeps_only_the_convolution_outputs():
    # What the backward pass may keep, before XLA compiles it: on a 12-layer block, the plain
    # model keeps every concatenation and BN-ReLU output, the remat'ed one the inputs of each
    # layer and its convolutions' outputs.
    spec = deep_block_spec()
    assert residual_bytes(spec, True) < 0.5 * residual_bytes(spec, False)


def test_zoo_constructor_accepts_memory_efficient(monkeypatch):
    from densenet_jax import DenseNet121, zoo

    monkeypatch.setattr(zoo, "load_canonical", lambda module, state: state)  # tracing DenseNet-121 is slow
    module, state = DenseNet121(num_classes=10, memory_efficient=True)
    assert module.memory_efficient and module.spec.name == "densenet121"
    assert state["classifier.weight"].shape == (10, 1024)


@pytest.mark.slow
def test_compiled_backward_pass_keeps_less_when_xla_keeps_remat_s_barriers():
    # XLA's CPU compiler removes jax.checkpoint's optimization barriers (its pass
    # cse_barrier_expander) before common-subexpression elimination, which then merges the
    # recomputation back into the forward pass: by default both models compile to the same
    # memory on a CPU. With the barriers kept, the memory-efficient one needs much less.
    spec, options = deep_block_spec(), {"xla_disable_hlo_passes": "cse_barrier_expander"}
    x = jax.ShapeDtypeStruct((16, 48, 48, spec.in_channels), jnp.float32)

    def temp_bytes(memory_efficient):
        module = DenseNet(spec, memory_efficient=memory_efficient)
        compiled = train_logits_and_gradients.lower(module, variable_shapes(module), x, KEY).compile(options)
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(True) < 0.75 * temp_bytes(False)
