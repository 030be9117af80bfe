"""Data-parallel training: the reference's two BatchNorm semantics, the declared engines, the
launcher, and JAX on 2 simulated CPU devices against the reference (docs/distributed.md)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conformance import backends, data, engines, reference, training, weights
from conformance.engines import NoDataParallel
from conformance.interface import BackendUnavailable
from conformance.specs import get_spec, is_running_stat
from conformance.suite import checks, parallel, report
from conformance.weights import init_state

SPEC = get_spec("tiny")
SIZE, BATCH, LR = 16, 4, 0.1
TESTS = str(Path(__file__).parent)


@pytest.fixture(scope="module")
def setup():
    state = init_state(SPEC, 0, randomize_bn=True)
    x, y = checks.make_batch(SPEC, SIZE, BATCH, 0)
    return state, x, y


def update(old, new, keys):
    return {key: np.asarray(new[key]) - np.asarray(old[key], np.float64) for key in keys}


def trainable(state):
    return [key for key in state if not is_running_stat(key)]


def running(state):
    return [key for key in state if is_running_stat(key)]


def assert_same_state(actual, expected, rtol=1e-12):
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=rtol, atol=1e-14, err_msg=key)


def test_sync_step_is_the_one_device_step_on_the_global_batch(setup):
    state, x, y = setup
    step = reference.data_parallel_sgd_step(SPEC, state, x, y, LR, 2, bn="sync")
    single, loss = reference.sgd_step(SPEC, state, x, y, LR)
    assert_same_state(step.state, single)
    assert step.loss == pytest.approx(loss, rel=1e-14)


def test_per_shard_step_on_one_device_is_the_plain_step(setup):
    state, x, y = setup
    step = reference.data_parallel_sgd_step(SPEC, state, x, y, LR, 1, bn="per_shard")
    assert_same_state(step.state, reference.sgd_step(SPEC, state, x, y, LR)[0])


def test_per_shard_step_averages_the_shards_steps_and_differs_from_sync(setup):
    state, x, y = setup
    step = reference.data_parallel_sgd_step(SPEC, state, x, y, LR, 2, bn="per_shard")
    shard_steps = [reference.sgd_step(SPEC, state, x[i : i + 2], y[i : i + 2], LR)[0] for i in (0, 2)]
    keys = trainable(state)
    mean = {key: np.mean([update(state, s, [key])[key] for s in shard_steps], axis=0) for key in keys}
    for key in keys:
        np.testing.assert_allclose(
            update(state, step.state, [key])[key], mean[key], rtol=1e-10, atol=1e-14, err_msg=key
        )
    sync = reference.data_parallel_sgd_step(SPEC, state, x, y, LR, 2, bn="sync")
    assert checks.worst_error(update(state, step.state, keys), update(state, sync.state, keys))[0] > 1e-2


def test_running_statistics_follow_the_named_rule(setup):
    state, x, y = setup
    keys = running(state)
    shards = [reference.sgd_step(SPEC, state, x[i : i + 2], y[i : i + 2], LR, "biased")[0] for i in (0, 2)]
    steps = {
        rule: reference.data_parallel_sgd_step(SPEC, state, x, y, LR, 2, "per_shard", rule, "biased")
        for rule in reference.RUNNING_STATS_RULES
    }
    assert_same_state({k: steps["rank0"].state[k] for k in keys}, {k: shards[0][k] for k in keys})
    assert_same_state({k: steps["mean"].state[k] for k in keys}, {k: (shards[0][k] + shards[1][k]) / 2 for k in keys})
    per_device = steps["per_device"].replica_running_stats
    assert_same_state(per_device[1], {k: shards[1][k] for k in keys})
    assert_same_state({k: steps["per_device"].state[k] for k in keys}, {k: shards[0][k] for k in keys})
    # Over two steps, replica 0's own chain (MXNet) is what DDP broadcasts (PyTorch); the mean is not.
    batches = [(x, y), checks.make_batch(SPEC, SIZE, BATCH, 1)]
    finals = {
        rule: reference.data_parallel_train(SPEC, state, batches, LR, 2, "per_shard", rule)[0]
        for rule in reference.RUNNING_STATS_RULES
    }
    assert_same_state({k: finals["per_device"][k] for k in keys}, {k: finals["rank0"][k] for k in keys})
    assert checks.worst_error({k: finals["mean"][k] for k in keys}, {k: finals["rank0"][k] for k in keys})[0] > 1e-3


def test_uneven_batches_and_unknown_names_are_clear_errors(setup):
    state, x, y = setup
    with pytest.raises(ValueError, match="batch of 4 does not split evenly over 3"):
        reference.data_parallel_sgd_step(SPEC, state, x, y, LR, 3)
    with pytest.raises(ValueError, match="bn must be one of"):
        reference.data_parallel_sgd_step(SPEC, state, x, y, LR, 2, bn="synchronised")
    with pytest.raises(ValueError, match="running_stats must be one of"):
        reference.data_parallel_sgd_step(SPEC, state, x, y, LR, 2, running_stats="broadcast")


def test_even_part_drops_at_most_devices_minus_one():
    assert len(engines.even_part(np.arange(7), 2)) == 6
    assert len(engines.even_part(np.arange(8), 4)) == 8
    assert engines.check_semantics({"cpu": ("per_shard",)}, "cpu", False, "x") == "per_shard"
    with pytest.raises(ValueError, match="cannot run sync BatchNorm on cpu devices; it runs: per_shard"):
        engines.check_semantics({"cpu": ("per_shard",)}, "cpu", True, "x")


@pytest.mark.parametrize("name", list(backends.BACKENDS))
def test_each_backend_runs_what_its_engine_declares_in_known_dtypes(name):
    try:
        module = engines.module_of(name)
    except BackendUnavailable as error:  # NoDataParallel too: that backend has no distributed.py yet
        pytest.skip(str(error))
    declared = engines.ENGINES[name]
    assert module.DECLARED is declared and declared.running_stats in reference.RUNNING_STATS_RULES
    semantics = {s for kinds in declared.bn_semantics.values() for s in kinds}
    assert semantics <= set(reference.BN_SEMANTICS)
    assert all(module.DTYPES[s] and set(module.DTYPES[s]) <= set(checks.DTYPES) for s in semantics)


def test_missing_trainer_and_missing_framework_are_told_apart(monkeypatch):
    monkeypatch.setenv(backends.EXTRA_BACKENDS_ENV, "ghost=ghost_backend,nodp=json")
    with pytest.raises(NoDataParallel, match="has no data-parallel trainer"):
        engines.module_of("nodp")
    with pytest.raises(BackendUnavailable, match="no_such_framework_xyz") as error:
        engines.module_of("ghost")
    assert not isinstance(error.value, NoDataParallel)


def test_conformance_notes_a_backend_without_data_parallelism(monkeypatch, tmp_path):
    monkeypatch.setenv(backends.EXTRA_BACKENDS_ENV, "nodp=json")
    (tmp_path / "nodp.json").write_text(json.dumps({"status": "ok", "rows": []}))
    parallel.conformance_phase("nodp", tmp_path, "cpu")
    saved = json.loads((tmp_path / "nodp.json").read_text())
    assert saved["data_parallel"]["status"] == "skipped" and saved["rows"] == []
    result = report.build(tmp_path, ["nodp"], [], "cpu", "", {}, False, 0.0)
    assert "nodp: data-parallel check skipped: backend 'nodp' has no data-parallel trainer" in report.markdown(result)


def test_a_lost_single_device_run_fails_the_row_not_the_job(monkeypatch, tmp_path):
    """The data-parallel phase branches the single-device run: files gone since are a failed
    row naming them, and the check itself still runs."""
    monkeypatch.setenv(backends.EXTRA_BACKENDS_ENV, "nodp=json")
    record = {"status": "ok", "rows": [], "training": {"epochs": [{"epoch": 1}, {"epoch": 2}]}}
    (tmp_path / "nodp.json").write_text(json.dumps(record))
    parallel.conformance_phase("nodp", tmp_path, "cpu", recipe="quick")
    saved = json.loads((tmp_path / "nodp.json").read_text())
    [row] = saved["rows"]
    assert row["check"] == "branch the single-device run" and not row["passed"]
    assert "cannot branch from epoch 1" in row["value"] and str(tmp_path / "train" / "nodp") in row["value"]
    assert saved["data_parallel"]["status"] == "skipped"


def test_sync_bn_needs_devices_and_an_even_batch(capsys):
    from conformance.cli import main

    assert main(["train", "--backend", "reference", "--sync-bn", "--out", "unused"]) == 2
    assert "--sync-bn) needs --devices 2 or more" in capsys.readouterr().err
    assert main(["train", "--backend", "reference", "--devices", "2", "--batch-size", "33", "--out", "unused"]) == 2
    assert "batch size 33 does not split evenly over 2 devices" in capsys.readouterr().err


def test_jax_matches_the_reference_on_two_simulated_devices(tmp_path):
    pytest.importorskip("jax", reason="JAX is not installed")
    result = parallel.launch_check("jax", tmp_path / "dp.json", 2, log=tmp_path / "log")
    assert result["status"] == "ok", result.get("reason") or (tmp_path / "log").read_text()
    failed = [
        (r["config"], r["dtype"], r["check"], r.get("error", r.get("value"))) for r in result["rows"] if not r["passed"]
    ]
    assert not failed
    measured = {(r["config"].split()[-1], r["dtype"]) for r in result["rows"]}
    assert measured == {(s, d) for s in ("sync", "per_shard") for d in ("float32", "float64")}
    assert result["bn_semantics"] == ["sync", "per_shard"] and result["running_stats"] == "mean"


@pytest.mark.skipif(not data._has_all(data.SYSTEM_DIR), reason="Fashion-MNIST not installed")
def test_jax_trains_on_two_devices_from_the_command_line(tmp_path, capfd):
    """`train --devices 2 --sync-bn` takes the single-device run's steps (same batches, same
    weights: synchronised BatchNorm is the one-device arithmetic) and records how it ran."""
    from conftest import backend_or_skip

    from conformance.cli import main

    backend = backend_or_skip("jax")
    recipe = training.Recipe(
        "test", size=16, batch_size=32, lr=0.1, momentum=0.9, epochs=1, train_examples=192, test_examples=64
    )
    argv = [
        "train",
        "--backend",
        "jax",
        "--arch",
        "tiny_d2l",
        "--size",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--momentum",
        "0.9",
        "--train-examples",
        "192",
        "--test-examples",
        "64",
        "--quiet",
    ]
    assert main(argv + ["--out", str(tmp_path / "dp"), "--devices", "2", "--sync-bn"]) == 0
    printed = json.loads(capfd.readouterr().out)
    saved = json.loads((tmp_path / "dp" / "metrics.json").read_text())
    assert printed["devices"] == saved["devices"] == 2 and saved["bn_semantics"] == printed["bn_semantics"] == "sync"
    assert saved["running_stats"] == "mean" and "NamedSharding" in saved["engine"]
    single = training.train(backend, "tiny_d2l", recipe, tmp_path / "one", progress=False)
    assert single["devices"] == 1
    np.testing.assert_allclose(saved["epochs"][0]["batch_losses"], single["epochs"][0]["batch_losses"], rtol=1e-4)
    assert os.path.isfile(tmp_path / "dp" / "model.safetensors")


@pytest.mark.skipif(not data._has_all(data.SYSTEM_DIR), reason="Fashion-MNIST not installed")
@pytest.mark.parametrize("name", list(backends.BACKENDS))
def test_a_run_continued_on_two_devices_starts_from_its_checkpoint(name, tmp_path, capfd):
    """What `make conformance` does: a one-device run branched after epoch 1, resumed on 2
    devices. Its first step must be the reference's data-parallel step from epoch 1's weights
    (a trainer that kept its initial weights once fooled the accuracy comparison)."""
    from conftest import backend_or_skip
    from data_parallel_cli import RECIPE, loop_batches, train_argv, train_on_two_devices

    from conformance.cli import main

    backend = backend_or_skip(name)
    assert main(train_argv("reference", tmp_path / "one")) == 0
    capfd.readouterr()  # its printed record
    training.branch(tmp_path / "one", tmp_path / "two", 1)
    _, saved = train_on_two_devices(name, tmp_path / "two", capfd, "--epochs", "2", "--resume")
    spec, _, batches = loop_batches(epoch=2)
    state = weights.load_state(tmp_path / "one" / "checkpoints" / "epoch-001.safetensors", spec)
    _, losses = reference.data_parallel_train(
        spec, state, batches[:1], RECIPE.lr, 2, saved["bn_semantics"], saved["running_stats"], backend.running_var
    )
    assert [e["epoch"] for e in saved["epochs"]] == [1, 2] and saved["branched_from"]["epoch"] == 1
    np.testing.assert_allclose(saved["epochs"][1]["batch_losses"][0], losses[0], rtol=1e-5)
