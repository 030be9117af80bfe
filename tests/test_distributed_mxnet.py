"""MXNet Gluon data parallelism on 2 CPU contexts (kvstore "device") against the reference's
per-shard BatchNorm step (docs/distributed.md). MXNet needs no simulated devices: mx.cpu(1)
exists in any process, so the in-process tests need no launcher."""

import numpy as onp
import pytest
from data_parallel_cli import float32_tolerances, loop_batches, train_on_two_devices

from conformance import data, engines, reference, weights
from conformance.specs import get_spec, is_running_stat
from conformance.suite import checks, parallel

pytest.importorskip("densenet_mxnet.compat", reason="MXNet is not installed (or cannot be imported here)")

import mxnet as mx  # noqa: E402

from densenet_mxnet.backend import Backend  # noqa: E402
from densenet_mxnet.distributed import make_trainer  # noqa: E402
from densenet_mxnet.weights import canonical_key, structural_params  # noqa: E402

SPEC = get_spec("tiny").replace(drop_rate=0.0)


def test_mxnet_matches_the_reference_on_two_contexts():
    """The conformance check, in this process: MXNet's contexts need no fresh one (the
    command-line test below goes through the launcher)."""
    backend, module = engines.prepare("mxnet", 2)
    rows = parallel.check(backend, module, 2)
    failed = [(r["config"], r["dtype"], r["check"], r.get("error", r.get("value"))) for r in rows if not r["passed"]]
    assert not failed
    measured = {(r["config"].split()[-1], r["dtype"]) for r in rows}
    assert measured == {("per_shard", "float32"), ("per_shard", "float64")}  # SyncBatchNorm: legacy mode only
    assert module.DECLARED.running_stats == "per_device"


def test_each_context_keeps_its_own_running_statistics():
    """Context 1's running statistics are its shard's (the reference's replica 1), not context 0's."""
    backend = Backend()
    state = weights.init_state(SPEC, 0, randomize_bn=True)
    x, y = checks.make_batch(SPEC, 16, 4, 0)
    x = x.astype("float64")
    model = backend.build(SPEC, "float64")
    backend.load_state(model, state)
    trainer = make_trainer(backend, model, checks.LR)
    trainer.train_step(x, y)
    lr, momentum = checks.effective_hyperparameters(backend)
    step = reference.data_parallel_sgd_step(SPEC, state, x, y, lr, 2, "per_shard", "per_device", "biased", momentum)
    replicas = [
        {
            canonical_key(name): param.data(mx.cpu(r)).asnumpy()
            for name, param in structural_params(model).items()
            if is_running_stat(canonical_key(name))
        }
        for r in (0, 1)
    ]
    for r, replica in enumerate(replicas):
        for key, value in replica.items():
            onp.testing.assert_allclose(
                value, step.replica_running_stats[r][key], rtol=1e-10, atol=1e-12, err_msg=f"context {r} {key}"
            )
    assert max(abs(replicas[0][k] - replicas[1][k]).max() for k in replicas[0]) > 1e-3
    assert backend.export_state(model)["features.norm0.running_mean"] == pytest.approx(
        replicas[0]["features.norm0.running_mean"], abs=0
    )


def test_a_resumed_run_keeps_the_contexts_in_step():
    """SGD's momentum, loaded into a new trainer, reaches every context's updater: the
    replicas take the same update (context 1 starting from zero momentum would not)."""
    backend = Backend()
    model = backend.build(SPEC)
    first = make_trainer(backend, model, 0.1, momentum=0.9)
    first.train_step(*checks.make_batch(SPEC, 16, 4, 0))
    momentum = first.export_optimizer_state()
    assert momentum and max(abs(buffer).max() for buffer in momentum.values()) > 0
    resumed = backend.build(SPEC)
    backend.load_state(resumed, backend.export_state(model))
    trainer = make_trainer(backend, resumed, 0.1, momentum=0.9)
    trainer.load_optimizer_state(momentum)
    trainer.train_step(*checks.make_batch(SPEC, 16, 4, 1))
    for name, param in structural_params(resumed).items():
        if param.grad_req != "null":
            onp.testing.assert_array_equal(
                param.data(mx.cpu(0)).asnumpy(), param.data(mx.cpu(1)).asnumpy(), err_msg=name
            )


def test_mxnet_refuses_what_its_engine_cannot_run():
    backend = Backend()
    model = backend.build(SPEC)
    with pytest.raises(ValueError, match="mxnet cannot run sync BatchNorm on cpu devices; it runs: per_shard"):
        make_trainer(backend, model, 0.1, sync_bn=True)
    trainer = make_trainer(backend, model, 0.1)
    x, y = checks.make_batch(SPEC, 16, 3, 0)
    with pytest.raises(ValueError, match="a batch of 3 does not split evenly over 2 devices"):
        trainer.train_step(x, y)


@pytest.mark.skipif(not data._has_all(data.SYSTEM_DIR), reason="Fashion-MNIST not installed")
def test_mxnet_trains_on_two_contexts_from_the_command_line(tmp_path, capfd):
    """`train --devices 2` takes the reference's per-shard steps on the training loop's
    batches (step_on), checkpoints context 0's running statistics, and records how."""
    _, saved = train_on_two_devices("mxnet", tmp_path / "dp", capfd)
    assert saved["bn_semantics"] == "per_shard"
    assert saved["running_stats"] == "per_device" and "kvstore='device'" in saved["engine"]

    spec, state, batches = loop_batches()
    lr, momentum = checks.effective_hyperparameters(Backend())
    expected, losses = reference.data_parallel_train(
        spec, state, batches, lr, 2, "per_shard", "per_device", "biased", momentum
    )
    onp.testing.assert_allclose(saved["epochs"][0]["batch_losses"], losses, rtol=1e-5)
    trained = weights.load_state(tmp_path / "dp" / "model.safetensors", spec)
    other, _ = reference.data_parallel_train(spec, state, batches, lr, 2, "per_shard", "mean", "biased", momentum)
    errors = parallel.compare_states(state, trained, expected, other)
    engine = dict(bn="per_shard", running_stats="per_device", running_var="biased", momentum=momentum)
    tolerances = float32_tolerances(spec, state, batches, expected, losses, lr=lr, **engine)
    assert errors["weights"][0] < tolerances["sgd_update"]
    assert errors["running"][0] < tolerances["running_stats_update"] < errors["running_other"]
