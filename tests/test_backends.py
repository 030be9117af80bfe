"""The contract every backend keeps, run against each installed backend.

A backend whose framework is not installed is skipped with the import error as reason.
"""

import numpy as np
import pytest

from conformance import specs, weights
from conformance.specs import ARCHS, InputError
from conformance.suite import checks
from conformance.weights import CheckpointError

NAMED = [
    "d2l",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet264",
    "densenet40_k12",
    "densenet_bc100_k12",
    "densenet_bc250_k24",
    "densenet_bc190_k40",
]


@pytest.mark.parametrize("arch", NAMED)
def test_parameter_counts_equal_the_spec(backend, arch):
    model = backend.build(ARCHS[arch])
    assert backend.count_params(model) == specs.count_params(ARCHS[arch])


@pytest.mark.parametrize("arch, size", [("d2l", 96), ("densenet_bc100_k12", 32), ("densenet121", 64), ("d2l", 37)])
def test_stage_shapes_follow_the_spec_in_native_layout(backend, arch, size):
    spec = ARCHS[arch]
    x = specs.to_layout(np.zeros((2, spec.in_channels, size, size), np.float32), backend.layout)
    shapes = backend.stage_shapes(backend.build(spec), x)
    assert {k: tuple(v) for k, v in shapes.items()} == dict(specs.stage_shapes(spec, size, 2, backend.layout))


@pytest.mark.parametrize("arch", ["tiny", "tiny_d2l", "densenet40_k12"])
def test_canonical_round_trip_is_bit_identical(backend, arch):
    spec = ARCHS[arch]
    state = weights.init_state(spec, seed=5, randomize_bn=True)
    model = backend.build(spec)
    backend.load_state(model, state)
    exported = backend.export_state(model)
    assert set(exported) == set(state)
    for key, value in state.items():
        assert exported[key].dtype == np.float32, key
        assert exported[key].tobytes() == value.tobytes(), key


@pytest.mark.parametrize(
    "damage, match",
    [
        (
            lambda s: s.pop("features.denseblock1.denselayer2.norm2.running_var"),
            "missing key.*denselayer2.norm2.running_var",
        ),
        (
            lambda s: s.__setitem__("features.norm6.weight", np.ones(4, np.float32)),
            "unexpected key.*features.norm6.weight",
        ),
        (
            lambda s: s.__setitem__("features.conv0.weight", np.ones((8, 3, 3, 3), np.float32)),
            r"mis-shaped key.*features.conv0.weight: expected \(8, 3, 7, 7\), got \(8, 3, 3, 3\)",
        ),
    ],
)
def test_bad_checkpoint_names_the_keys(backend, damage, match):
    state = weights.init_state(ARCHS["tiny"])
    damage(state)
    with pytest.raises(CheckpointError, match=match):
        backend.load_state(backend.build(ARCHS["tiny"]), state)


# The full-size nets are the `make conformance` matrix (d2l@96, BC-100@32): that job checks them in
# every backend; here they run under the slow mark (a cold JAX compile of BC-100 alone takes minutes).
@pytest.mark.parametrize(
    "arch, size, batch",
    [
        ("tiny", 19, 4),
        ("tiny_d2l", 13, 4),
        pytest.param("d2l", 96, 4, marks=pytest.mark.slow),
        pytest.param("densenet_bc100_k12", 32, 4, marks=pytest.mark.slow),
    ],
)
def test_matches_the_reference(backend, arch, size, batch):
    results = checks.compare_with_reference(backend, arch, size, batch)
    failures = {
        f"{dtype}/{name}": item
        for dtype, items in results.items()
        for name, item in items.items()
        if not item["passed"]
    }
    assert not failures


def test_running_variance_convention_is_the_declared_one(backend):
    results = checks.compare_with_reference(backend, "tiny", 19, 4, dtypes=("float64",))
    item = results["float64"]["running_stats_update"]
    assert item["passed"] and item["convention"] == backend.running_var
    assert item["error_under_other_convention"] > 1e6 * item["tolerance"]


def test_gradients_pass_moves_running_statistics_once(backend):
    """Without the trainer's step (the big nets of `make conformance`), the running statistics
    are read after the gradients' train-mode pass: it must move them as one step does."""
    results = checks.compare_with_reference(backend, "tiny", 19, 4, dtypes=("float64",), trainer_step=False)["float64"]
    assert "sgd_update" not in results
    item = results["running_stats_update"]
    assert item["passed"] and item["error_under_other_convention"] > 1e6 * item["tolerance"]


def _batch(backend, spec, size, n=2, dtype=np.float32):
    return specs.to_layout(np.zeros((n, spec.in_channels, size, size), dtype), backend.layout)


def test_bad_input_gets_a_clear_error(backend):
    spec = ARCHS["tiny_d2l"]
    model = backend.build(spec)
    good = _batch(backend, spec, 13)
    other_layout = "NHWC" if backend.layout == "NCHW" else "NCHW"
    with pytest.raises(InputError, match="rank 3"):
        backend.forward(model, good[0], train=False)
    with pytest.raises(InputError, match=r"1 input channel\(s\)"):
        backend.forward(model, np.concatenate([good, good], axis=1 if backend.layout == "NCHW" else 3), train=False)
    transposed = np.zeros((2, 13, 13, 1) if backend.layout == "NCHW" else (2, 1, 13, 13), np.float32)
    with pytest.raises(InputError, match=f"looks like {other_layout}"):
        backend.forward(model, transposed, train=False)
    with pytest.raises(InputError, match="expects float32 input, got uint8"):
        backend.forward(model, good.astype(np.uint8), train=False)
    with pytest.raises(InputError, match=r"too small.*5x5"):
        backend.forward(model, _batch(backend, spec, 4), train=False)


def test_checkpoint_inference_needs_no_dummy_call(backend, tmp_path):
    spec = ARCHS["tiny_d2l"]
    state = weights.init_state(spec, seed=2, randomize_bn=True)
    weights.save_state(tmp_path / "w.safetensors", state, spec)
    model = backend.build(spec)
    backend.load_state(model, weights.load_state(tmp_path / "w.safetensors"))
    x = np.random.default_rng(0).standard_normal((3, 1, 13, 13)).astype(np.float32)
    logits = backend.forward(model, specs.to_layout(x, backend.layout), train=False)
    from conformance import reference

    np.testing.assert_allclose(logits, reference.forward(spec, state, x), rtol=1e-4, atol=1e-5)


def test_momentum_state_survives_export_and_load(backend):
    """Two trainers, one restored from the other's exported weights and optimiser state,
    take exactly the same next step."""
    spec = ARCHS["tiny_d2l"]
    rng = np.random.default_rng(0)
    batches = [
        (
            specs.to_layout(rng.standard_normal((4, 1, 13, 13)).astype(np.float32), backend.layout),
            rng.integers(0, 10, 4),
        )
        for _ in range(3)
    ]
    first = backend.build(spec)
    backend.load_state(first, weights.init_state(spec))
    trainer = backend.make_trainer(first, lr=0.1, momentum=0.9)
    for x, y in batches[:2]:
        trainer.train_step(x, y)
    momentum = trainer.export_optimizer_state()
    assert set(momentum) == set(weights.trainable_keys(spec))
    assert all(momentum[k].shape == specs.parameter_table(spec)[k] for k in momentum)

    second = backend.build(spec)
    backend.load_state(second, backend.export_state(first))
    resumed = backend.make_trainer(second, lr=0.1, momentum=0.9)
    resumed.load_optimizer_state(momentum)
    trainer.train_step(*batches[2])
    resumed.train_step(*batches[2])
    a, b = backend.export_state(first), backend.export_state(second)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not np.allclose(momentum["classifier.weight"], 0)


def test_trainer_reports_loss_and_correct_count(backend):
    spec = ARCHS["tiny_d2l"]
    model = backend.build(spec)
    backend.load_state(model, weights.init_state(spec))
    x = specs.to_layout(np.random.default_rng(1).standard_normal((6, 1, 13, 13)).astype(np.float32), backend.layout)
    y = np.arange(6) % 10
    trainer = backend.make_trainer(model, lr=0.05)
    losses = [trainer.train_step(x, y)[0] for _ in range(5)]
    assert losses[-1] < losses[0]
    logits = trainer.predict(x)
    assert logits.shape == (6, 10)
    loss, correct = trainer.train_step(x, y)
    assert 0 <= correct <= 6 and np.isfinite(loss)
