"""Trajectories: every backend's trainer, step by step in float64, against the NumPy reference."""

import numpy as np
import pytest
from conftest import resized_data

from conformance import data, trajectory
from conformance.suite import report

pytestmark = pytest.mark.skipif(
    not data._has_all(data.SYSTEM_DIR), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)

# Seconds per backend: the tiny_d2l net at 16x16, six steps of 32, exported every other step.
SETUP = trajectory.Setup("test", "tiny_d2l", 16, 32, 6, 0.125, 0.875, 2, 6 * 32, 100, reference_steps=6)


resized_cache = resized_data(SETUP.size)


@pytest.fixture(scope="module")
def reference_runs():
    return {m: trajectory.reference_run(SETUP, m, SETUP.steps)["weights"] for m in (0.0, SETUP.momentum)}


@pytest.mark.parametrize("momentum", [0.0, SETUP.momentum])
def test_float64_training_follows_the_reference(backend, reference_runs, momentum):
    """step_on trains a float64 model in float64: images cast to float32 first would put the
    weights about 5e-8 from the reference's, a learning rate of 0.1 rounded to float32 1.5e-8."""
    run = trajectory.backend_run(backend, SETUP, "float64", momentum)
    assert sorted(run["weights"]) == [0, 2, 4, 6]
    comparison = trajectory.compare({backend.name: run}, reference_runs[momentum])
    errors = comparison["backends"][backend.name]["to_reference"]
    assert set(errors) == {0, 2, 4, 6}
    assert errors[0] == 0.0
    assert max(errors.values()) < report.TRAJECTORY_TOLERANCE
    assert trajectory.difference(run["weights"][6], run["weights"][0]) > 1e-3  # it did train


@pytest.mark.slow
def test_float32_training_leaves_the_float64_path(backend, reference_runs):
    run = trajectory.backend_run(backend, SETUP, "float32", 0.0)
    errors = trajectory.compare({backend.name: run}, reference_runs[0.0])["backends"][backend.name]["to_reference"]
    assert 1e-9 < errors[6] < 1e-2


def test_compare_counts_predictions_that_differ_anywhere():
    state = {"features.conv0.weight": np.ones((2, 2)), "features.norm0.running_mean": np.zeros(2)}
    moved = {"features.conv0.weight": np.array([[1.0, 1.5], [1.0, 1.0]]), "features.norm0.running_mean": np.ones(2)}
    runs = {
        "a": {"weights": {0: state, 2: state}, "predictions": np.array([1, 2, 3, 4])},
        "b": {"weights": {0: state, 2: moved}, "predictions": np.array([1, 2, 0, 4])},
        "c": {"weights": {0: state}, "predictions": np.array([1, 2, 3, 5])},
    }
    comparison = trajectory.compare(runs)
    assert comparison["predictions_differing"] == 2 and comparison["test_images"] == 4
    assert comparison["backends"]["a"]["steps"] == [0]  # the steps every backend has
    two = trajectory.compare({k: runs[k] for k in "ab"})
    assert two["backends"]["b"]["to_others"] == [0.0, 0.5]  # running statistics are not compared


def test_batches_cover_the_data_once_per_epoch():
    setup = SETUP
    examples = setup.train_examples
    seen = np.concatenate([trajectory.batch_indices(setup, step, examples) for step in range(1, setup.steps + 1)])
    assert sorted(seen) == list(range(examples))
    np.testing.assert_array_equal(seen, data.epoch_order(examples, setup.seed, 1))


def test_report_rows_fail_a_trajectory_off_the_reference(tmp_path, monkeypatch, reference_runs):
    monkeypatch.setitem(trajectory.SETUPS, trajectory.CONFORMANCE, SETUP)
    out = tmp_path / "trajectory"
    for momentum in (0.0, SETUP.momentum):
        exact = {"weights": reference_runs[momentum], "predictions": np.zeros(3)}
        off = {
            "weights": {s: {k: v * (1 + 1e-9) for k, v in w.items()} for s, w in reference_runs[momentum].items()},
            "predictions": np.zeros(3),
        }
        trajectory.save_run(trajectory.run_path(out, "good", "float64", momentum), exact, {})
        trajectory.save_run(trajectory.run_path(out, "bad", "float64", momentum), off, {})
    rows, failures = {}, []
    results = {"good": {"trajectory": {"setup": "test"}}, "bad": {"trajectory": {"setup": "test"}}}
    summary = report._trajectory_rows(tmp_path, results, rows, failures)
    (row,) = rows.values()
    assert row["results"]["good"] == {"error": 0.0, "passed": True}
    assert not row["results"]["bad"]["passed"] and row["results"]["bad"]["error"] == pytest.approx(1e-9, rel=1e-3)
    assert len(failures) == 1 and failures[0].startswith("bad: tiny_d2l@16 float64 trajectory")
    assert summary["runs"]["float64-momentum-0"]["predictions_differing"] == 0


@pytest.mark.slow
def test_quick_setup_agrees_across_backends_for_a_full_epoch(tmp_path):
    """The command's full run: 94 steps of the d2l net in every backend, float64 within the
    conformance tolerance of each other, float32 far outside it."""
    result = trajectory.run(["torch", "mxnet", "tf", "jax"], "quick", tmp_path, reference_steps=2)
    for label, run in result["runs"].items():
        worst = max(trajectory.worst(run, name) for name in run["backends"])
        if run["dtype"] == "float64":
            assert worst < report.TRAJECTORY_TOLERANCE, label
            assert all(trajectory.worst(run, n, "to_reference") < report.TRAJECTORY_TOLERANCE for n in run["backends"])
        else:
            assert worst > 1e-6, label
    assert (tmp_path / "trajectory.png").stat().st_size > 0
