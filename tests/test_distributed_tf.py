"""TensorFlow MirroredStrategy on 2 simulated CPU devices against the reference's per-shard and
synchronised BatchNorm steps (docs/distributed.md). Each launch starts a fresh process: the
logical CPU devices must be configured before TensorFlow initialises."""

import numpy as np
import pytest
from data_parallel_cli import RECIPE, float32_tolerances, loop_batches, train_on_two_devices

from conformance import data, engines, reference, weights
from conformance.specs import get_spec
from conformance.suite import checks, parallel

pytest.importorskip("tensorflow", reason="TensorFlow is not installed")


def run_check(tmp_path, dtypes):
    result = parallel.launch_check(
        "tf", tmp_path / "dp.json", 2, log=tmp_path / "log", extra=["--dtypes", ",".join(dtypes)]
    )
    assert result["status"] == "ok", result.get("reason") or (tmp_path / "log").read_text()
    failed = [
        (r["config"], r["dtype"], r["check"], r.get("error", r.get("value"))) for r in result["rows"] if not r["passed"]
    ]
    assert not failed
    measured = {(r["config"].split()[-1], r["dtype"]) for r in result["rows"]}
    assert measured == {(sem, dtype) for sem in ("per_shard", "sync") for dtype in dtypes}
    # Keras 3's running statistics are not averaged over the replicas: replica 0's are kept.
    assert result["bn_semantics"] == ["per_shard", "sync"] and result["running_stats"] == "rank0"


def test_tf_matches_the_reference_on_two_simulated_devices_in_float64(tmp_path):
    run_check(tmp_path, ["float64"])  # float64 tells the semantics apart ("dp tells the semantics apart" rows)


@pytest.mark.slow
def test_tf_matches_the_reference_on_two_simulated_devices_in_both_dtypes(tmp_path):
    run_check(tmp_path, list(checks.DTYPES))


@pytest.mark.slow
@pytest.mark.skipif(not data._has_all(data.SYSTEM_DIR), reason="Fashion-MNIST not installed")
@pytest.mark.parametrize("sync_bn", [False, True], ids=["per_shard", "sync"])
def test_tf_trains_on_two_devices_from_the_command_line(tmp_path, capfd, sync_bn):
    """`train --devices 2` on MirroredStrategy takes the reference's steps on the training
    loop's batches (step_on), keeps replica 0's running statistics, and records how."""
    semantics = engines.bn_semantics(sync_bn)
    _, saved = train_on_two_devices("tf", tmp_path / "dp", capfd, *["--sync-bn"] * sync_bn)
    assert saved["bn_semantics"] == semantics
    assert saved["running_stats"] == "rank0" and "MirroredStrategy" in saved["engine"]

    spec, state, batches = loop_batches()
    expected, losses = reference.data_parallel_train(spec, state, batches, RECIPE.lr, 2, semantics, "rank0", "biased")
    np.testing.assert_allclose(saved["epochs"][0]["batch_losses"], losses, rtol=1e-5)
    trained = weights.load_state(tmp_path / "dp" / "model.safetensors", spec)
    other_semantics = engines.bn_semantics(not sync_bn)
    other, _ = reference.data_parallel_train(spec, state, batches, RECIPE.lr, 2, other_semantics, "rank0", "biased")
    errors = parallel.compare_states(state, trained, expected, other)
    engine = dict(bn=semantics, running_stats="rank0", running_var="biased")
    tolerances = float32_tolerances(spec, state, batches, expected, losses, **engine)
    assert errors["running"][0] < tolerances["running_stats_update"] < errors["running_other"]
    assert errors["weights"][0] < tolerances["sgd_update"] < errors["weights_other"]


def test_tf_refuses_too_many_devices():
    """In this process TensorFlow has (at most) the one CPU device it was started with."""
    from densenet_tf.backend import Backend
    from densenet_tf.distributed import make_trainer

    backend = Backend()
    with pytest.raises(ValueError, match="3 devices asked for, but TensorFlow sees 1 cpu device"):
        make_trainer(backend, backend.build(get_spec("tiny")), 0.1, devices=3)
