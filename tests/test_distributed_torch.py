"""PyTorch DistributedDataParallel on 2 CPU processes (torchrun, gloo) against the reference's
per-shard BatchNorm step (docs/distributed.md). Each launch starts two torch processes."""

import numpy as np
import pytest
from data_parallel_cli import RECIPE, float32_tolerances, loop_batches, train_on_two_devices

from conformance import data, reference, weights
from conformance.specs import get_spec
from conformance.suite import parallel

pytest.importorskip("torch", reason="PyTorch is not installed")


def test_torch_matches_the_reference_on_two_processes(tmp_path):
    result = parallel.launch_check("torch", tmp_path / "dp.json", 2, log=tmp_path / "log")
    assert result["status"] == "ok", result.get("reason") or (tmp_path / "log").read_text()
    failed = [
        (r["config"], r["dtype"], r["check"], r.get("error", r.get("value"))) for r in result["rows"] if not r["passed"]
    ]
    assert not failed
    measured = {(r["config"].split()[-1], r["dtype"]) for r in result["rows"]}
    assert measured == {("per_shard", "float32"), ("per_shard", "float64")}  # SyncBatchNorm is CUDA-only
    assert result["bn_semantics"] == ["per_shard"] and result["running_stats"] == "rank0"


@pytest.mark.skipif(not data._has_all(data.SYSTEM_DIR), reason="Fashion-MNIST not installed")
def test_torch_trains_on_two_processes_from_the_command_line(tmp_path, capfd):
    """`train --devices 2` through torchrun takes the reference's per-shard steps on the
    training loop's batches (step_on), keeps rank 0's running statistics, and records how."""
    _, saved = train_on_two_devices("torch", tmp_path / "dp", capfd)
    assert saved["bn_semantics"] == "per_shard"
    assert saved["running_stats"] == "rank0" and "DistributedDataParallel" in saved["engine"]

    spec, state, batches = loop_batches()
    expected, losses = reference.data_parallel_train(spec, state, batches, RECIPE.lr, 2, "per_shard", "rank0")
    np.testing.assert_allclose(saved["epochs"][0]["batch_losses"], losses, rtol=1e-5)
    trained = weights.load_state(tmp_path / "dp" / "model.safetensors", spec)
    other, _ = reference.data_parallel_train(spec, state, batches, RECIPE.lr, 2, "per_shard", "mean")
    errors = parallel.compare_states(state, trained, expected, other)
    tolerances = float32_tolerances(spec, state, batches, expected, losses, bn="per_shard", running_stats="rank0")
    assert errors["weights"][0] < tolerances["sgd_update"]
    assert errors["running"][0] < tolerances["running_stats_update"] < errors["running_other"]


def test_torch_refuses_what_its_engine_cannot_run(monkeypatch):
    from densenet_torch.backend import Backend
    from densenet_torch.distributed import make_trainer

    backend = Backend()
    model = backend.build(get_spec("tiny"))
    with pytest.raises(ValueError, match="torch cannot run sync BatchNorm on cpu devices; it runs: per_shard"):
        make_trainer(backend, model, 0.1, sync_bn=True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="one process per device: start it with torchrun"):
        make_trainer(backend, model, 0.1)
