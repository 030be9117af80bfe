import numpy as np
import pytest

from conformance import reference
from conformance.specs import ARCHS, InputError
from conformance.weights import init_state

FD_TOLERANCE = 1e-3


@pytest.mark.parametrize("arch, size", [("tiny", 19), ("tiny_d2l", 13)])
def test_backward_matches_finite_differences(arch, size):
    worst, where = reference.gradient_check(ARCHS[arch], size, batch=3, samples_per_tensor=3)
    assert worst < FD_TOLERANCE, where


def test_backward_matches_finite_differences_on_a_cifar_net():
    spec = ARCHS["densenet40_k12"].replace(block_config=(2, 2, 2))
    worst, where = reference.gradient_check(spec, 8, batch=2)
    assert worst < FD_TOLERANCE, where


def test_eval_mode_uses_running_statistics(rng):
    spec = ARCHS["tiny"]
    state = init_state(spec, randomize_bn=True)
    x = rng.standard_normal((2, 3, 19, 19))
    a = reference.forward(spec, state, x, train=False)
    b = reference.forward(spec, state, x[:1], train=False)
    np.testing.assert_allclose(a[:1], b, rtol=1e-12)  # per-example in eval mode
    c = reference.forward(spec, state, x, train=True)
    assert not np.allclose(a, c)


def test_running_variance_conventions_differ_by_n_over_n_minus_1(rng):
    spec = ARCHS["tiny"]
    state = init_state(spec)
    x = rng.standard_normal((2, 3, 19, 19))
    result = reference.loss_and_gradients(spec, state, x, np.array([0, 1]))
    biased = reference.update_running_stats(state, result.batch_stats, "biased")
    unbiased = reference.update_running_stats(state, result.batch_stats, "unbiased")
    mean, var, n = result.batch_stats["features.norm0"]
    assert n == 2 * 10 * 10
    np.testing.assert_allclose(unbiased["features.norm0.running_var"], 0.9 + 0.1 * var * n / (n - 1))
    np.testing.assert_allclose(biased["features.norm0.running_var"], 0.9 + 0.1 * var)
    np.testing.assert_allclose(biased["features.norm0.running_mean"], 0.1 * mean)


def test_sgd_step_moves_parameters_by_lr_times_gradient(rng):
    spec = ARCHS["tiny_d2l"]
    state = init_state(spec)
    x, y = rng.standard_normal((2, 1, 13, 13)), np.array([3, 4])
    result = reference.loss_and_gradients(spec, state, x, y)
    new, loss = reference.sgd_step(spec, state, x, y, lr=0.5)
    assert loss == result.loss
    np.testing.assert_allclose(
        new["classifier.weight"], state["classifier.weight"] - 0.5 * result.grads["classifier.weight"]
    )
    np.testing.assert_allclose(new["features.norm0.running_mean"], result.running_stats["features.norm0.running_mean"])


def test_stage_shapes_follow_the_spec(rng):
    spec = ARCHS["d2l"]
    shapes = reference.stage_shapes(spec, init_state(spec), rng.standard_normal((1, 1, 40, 40)))
    assert shapes["stem"] == (1, 64, 10, 10) and shapes["denseblock4"] == (1, 248, 1, 1)


def test_reference_validates_its_input(rng):
    with pytest.raises(InputError, match="too small"):
        reference.forward(ARCHS["d2l"], init_state(ARCHS["d2l"]), rng.standard_normal((1, 1, 28, 28)))


def test_a_config_without_float32_training_checks_float32_in_eval_mode_only():
    """The big nets of `make conformance` (checks.Config.float32_training=False): float32 runs
    the eval pass only, float64 every check; the caller's float32 model is the one checked."""
    from conformance.backends import load_backend
    from conformance.suite import checks

    backend = load_backend("reference")
    built = []
    build = backend.build
    backend.build = lambda *args, **kwargs: built.append(args) or build(*args, **kwargs)
    model = build(checks.checked_spec("tiny"))
    results = checks.compare_with_reference(
        backend, "tiny", 19, 2, trainer_step=False, float32_training=False, float32_model=model
    )
    assert list(results["float32"]) == ["forward_eval"]
    assert {"forward_train", "loss", "gradients", "running_stats_update"} <= set(results["float64"])
    assert [args[1] for args in built] == ["float64"]  # float32's model was not built again
    assert results["float32"]["forward_eval"]["passed"]
