"""`densenet-xf train --nodes 2`: two processes that talk only over 127.0.0.1, as two machines
would, on each framework's own engine (docs/distributed.md). The runs are checked against
the reference's data-parallel steps on the training loop's own batches; a process killed
mid-epoch must stop the other with a clear error in bounded time, and a run resumes from
its last committed epoch on another number of processes with the batches a single run takes.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_parallel_cli import RECIPE, float32_tolerances, loop_batches, train_argv

from conformance import data, engines, reference, weights
from conformance.cli import main
from conformance.suite import parallel

ROOT = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(not data._has_all(data.SYSTEM_DIR), reason="Fashion-MNIST not installed")
# What one node may take, start to end, on a loaded 2-core machine (a cold framework import
# takes tens of seconds); a node stopped by a lost peer must end well before it.
NODE_LIMIT_S = 300
RUNNING_VAR = {
    "torch": "unbiased",
    "jax": "biased",
    "mxnet": "biased",
    "tf": "biased",
}  # each backend's Backend.running_var
WIRED = [name for name, engine in engines.ENGINES.items() if engine.multi_process]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_nodes(backend, out, *extra, nodes=2, env=None) -> tuple[list[subprocess.CompletedProcess], float]:
    """`train` as `nodes` nodes on this machine, each a process of its own; (their results, seconds)."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    env.pop(engines.LAUNCHED_ENV, None)
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "conformance",
                *train_argv(backend, out, "--nodes", str(nodes), "--node-rank", str(rank)),
                "--coordinator",
                coordinator,
                *extra,
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(nodes)
    ]
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=max(1.0, NODE_LIMIT_S - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail(f"a node of the {backend} run was still running after {NODE_LIMIT_S} s (a hang)")
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results, time.monotonic() - start


def reference_epoch(run_dir, backend, epoch, devices, bn="per_shard"):
    """The reference's steps over `epoch`'s batches from the run's checkpoint of the epoch
    before (or the initial weights), on `devices` devices with BatchNorm semantics `bn` and the
    engine's running-statistics rule; and the steps that differ (per-shard: the other rule;
    sync: per-shard)."""
    spec, state, batches = loop_batches(epoch)
    if epoch > 1:
        state = weights.load_state(run_dir / f"checkpoints/epoch-{epoch - 1:03d}.safetensors", spec)
    rule, variance = engines.ENGINES[backend].running_stats, RUNNING_VAR[backend]
    other_rule = "mean" if rule != "mean" or bn == "sync" else "rank0"
    expected, losses = reference.data_parallel_train(spec, state, batches, RECIPE.lr, devices, bn, rule, variance)
    other, _ = reference.data_parallel_train(
        spec, state, batches, RECIPE.lr, devices, "per_shard", other_rule, variance
    )
    return spec, state, expected, other, losses


def check_epoch(run_dir, backend, epoch, devices, bn="per_shard"):
    """The run's `epoch` took the reference's steps on `devices` devices."""
    record = json.loads((run_dir / "metrics.json").read_text())
    spec, state, expected, other, losses = reference_epoch(run_dir, backend, epoch, devices, bn)
    np.testing.assert_allclose(record["epochs"][epoch - 1]["batch_losses"], losses, rtol=1e-5)
    trained = weights.load_state(run_dir / f"checkpoints/epoch-{epoch:03d}.safetensors", spec)
    errors = parallel.compare_states(state, trained, expected, other)
    engine = dict(bn=bn, running_stats=engines.ENGINES[backend].running_stats, running_var=RUNNING_VAR[backend])
    tolerances = float32_tolerances(spec, state, loop_batches(epoch)[2], expected, losses, devices=devices, **engine)
    assert errors["weights"][0] < tolerances["sgd_update"], errors
    if devices > 1:  # one device: the rules and semantics are the same
        assert errors["running"][0] < tolerances["running_stats_update"] < errors["running_other"]
    return record


def test_cluster_arguments_are_checked_before_anything_starts(tmp_path, capsys):
    argv = train_argv("torch", tmp_path / "run")
    assert main([*argv, "--nodes", "2", "--node-rank", "2", "--coordinator", "127.0.0.1:1234"]) == 2
    assert "--node-rank 2 is not below --nodes 2" in capsys.readouterr().err
    assert main([*argv, "--nodes", "2"]) == 2
    assert "--nodes 2 needs --coordinator HOST:PORT" in capsys.readouterr().err
    assert main([*argv, "--nodes", "2", "--coordinator", "127.0.0.1"]) == 2
    assert "is not HOST:PORT" in capsys.readouterr().err
    cluster = [*argv, "--nodes", "2", "--coordinator", "127.0.0.1:1234"]
    assert main([*cluster, "--workers", "127.0.0.1:1234"]) == 2
    assert "--workers names 1 address(es) for --nodes 2: give one HOST:PORT per node" in capsys.readouterr().err
    assert main([*cluster, "--workers", "127.0.0.1:1234,host1"]) == 2
    assert "--workers: 'host1' is not HOST:PORT" in capsys.readouterr().err
    assert main([*cluster, "--workers", "10.0.0.2:1234,10.0.0.3:1234"]) == 2
    assert "--workers starts with 10.0.0.2:1234, but node 0's address is --coordinator 127.0.0.1:1234" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()


def test_every_backend_has_multi_process_training():
    assert WIRED == list(engines.ENGINES)


def test_each_node_launches_its_part_of_the_cluster():
    """PyTorch: a torchrun per node at the coordinator, node 0 hosting the rendezvous store;
    JAX: one process per node, its rank given to the process (it joins in join_cluster)."""
    nodes = [engines.make_cluster(2, rank, "10.0.0.1:29500", 1) for rank in range(2)]
    assert [node.world for node in nodes] == [2, 2]
    commands = [" ".join(engines.command("torch", 1, ["-m", "conformance"], node)) for node in nodes]
    for rank, line in enumerate(commands):
        assert "-m torch.distributed.run --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d" in line
        assert "--rdzv-endpoint 10.0.0.1:29500" in line and f"is_host={int(rank == 0)}," in line
        assert f"join_timeout={engines.JOIN_TIMEOUT_S}" in line and "--max-restarts 0" in line
    assert engines.command("jax", 1, ["-m", "conformance"], nodes[1])[1:] == ["-m", "conformance"]
    assert engines.shard_of(list(range(8)), 1, 4) == [2, 3]


def test_each_worker_has_an_address_of_its_own():
    """TensorFlow's workers each listen (TF_CONFIG names them all): by default at the
    coordinator's host, port + rank; --workers names them across machines."""
    assert engines.make_cluster(3, 2, "127.0.0.1:29500", 1).workers == (
        "127.0.0.1:29500",
        "127.0.0.1:29501",
        "127.0.0.1:29502",
    )
    named = engines.make_cluster(2, 1, "10.0.0.1:12345", 1, "10.0.0.1:12345,10.0.0.2:12345")
    assert named.workers == ("10.0.0.1:12345", "10.0.0.2:12345") and named.coordinator == "10.0.0.1:12345"


def test_the_parameter_server_runs_on_node_0_with_the_dmlc_variables():
    """MXNet: every node a worker, node 0 also ps-lite's scheduler (at the coordinator) and server."""
    node = engines.make_cluster(2, 1, "10.0.0.1:9091", 1)
    assert engines.dmlc_env(node, "worker") == {
        "DMLC_ROLE": "worker",
        "DMLC_PS_ROOT_URI": "10.0.0.1",
        "DMLC_PS_ROOT_PORT": "9091",
        "DMLC_NUM_SERVER": "1",
        "DMLC_NUM_WORKER": "2",
    }
    assert engines.command("mxnet", 1, ["-m", "conformance"], node)[1:] == ["-m", "conformance"]


@pytest.mark.parametrize("backend", WIRED)
def test_a_coordinator_port_in_use_is_a_clear_error(backend, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [*train_argv(backend, tmp_path / "run"), "--nodes", "2", "--coordinator", f"127.0.0.1:{port}"]
        assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the coordinator port 127.0.0.1:{port} cannot be used on node 0" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("backend", sorted(engines.OWN_ADDRESS))
def test_a_worker_port_in_use_is_a_clear_error(backend, tmp_path, capsys):
    """Where every node listens (TensorFlow's workers), node 1 checks its own port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        workers = f"127.0.0.1:{free_port()},127.0.0.1:{port}"
        argv = [*train_argv(backend, tmp_path / "run"), "--nodes", "2", "--node-rank", "1"]
        assert main([*argv, "--coordinator", workers.split(",")[0], "--workers", workers]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"node 1's worker port 127.0.0.1:{port} cannot be used on this node" in err[0]
    assert "choose another --workers" in err[0]


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("backend", WIRED)
def test_one_process_then_two_nodes_take_the_reference_steps(backend, tmp_path, capfd):
    """Epoch 1 in one process, epoch 2 resumed on two nodes: the second epoch is the
    reference's 2-device per-shard step from the first's canonical checkpoint."""
    out = tmp_path / "run"
    assert main(train_argv(backend, out, "--epochs", "1")) == 0
    capfd.readouterr()
    results, _ = run_nodes(backend, out, "--epochs", "2", "--resume")
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    record = check_epoch(out, backend, 2, devices=2)
    assert record["devices"] == 2 and record["bn_semantics"] == "per_shard"
    check_epoch(out, backend, 1, devices=1)


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("backend", WIRED)
def test_a_killed_node_stops_the_other_and_the_run_resumes_on_one_process(backend, tmp_path, capfd):
    """Two nodes: epoch 1 is the reference's 2-device step; rank 1 is killed at step 2 of
    epoch 2, the other exits with a clear error in bounded time; one process resumes epoch 2
    from the committed epoch 1 and takes the single run's steps."""
    out = tmp_path / "run"
    results, seconds = run_nodes(backend, out, "--epochs", "2", env={engines.KILL_ENV: "1:2:2"})
    assert all(r.returncode != 0 for r in results), [r.stderr[-2000:] for r in results]
    said = [line for r in results for line in r.stderr.splitlines() if line.startswith("densenet-xf train: error:")]
    assert said, [r.stderr[-3000:] for r in results]  # the survivor's (which node held rank 1 is torchrun's choice)
    assert seconds < NODE_LIMIT_S
    with capfd.disabled():  # what docs/distributed.md reports
        print(f"\n{backend}: both nodes ended {seconds:.0f} s after start; the survivor said: {said[0]}")
    record = json.loads((out / "metrics.json").read_text())
    assert len(record["epochs"]) == 1
    check_epoch(out, backend, 1, devices=2)

    assert main(train_argv(backend, out, "--epochs", "2", "--resume")) == 0
    capfd.readouterr()
    check_epoch(out, backend, 2, devices=1)


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in WIRED if "sync" in engines.ENGINES[b].bn_semantics["cpu"]])
def test_two_nodes_with_sync_batchnorm_take_the_reference_steps(backend, tmp_path):
    """--sync-bn over two nodes: BatchNorm on the global batch spread over both processes."""
    out = tmp_path / "run"
    results, _ = run_nodes(backend, out, "--sync-bn")
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    record = check_epoch(out, backend, 1, devices=2, bn="sync")
    assert record["devices"] == 2 and record["bn_semantics"] == "sync"


@pytest.mark.parametrize("holds_lock, status", [(False, 2), (True, -9)])
def test_a_bounded_wait_ends_the_process_with_one_line(holds_lock, status):
    """A wait the engine would never fail (MXNet's kvstore, TensorFlow's join) ends in bounded
    time: from a thread (exit status 2) or, for a call holding Python's lock, from a watchdog
    process (SIGKILL); either way with PeerLost's line."""
    code = (
        "import time; from conformance import engines\n"
        f"with engines.bounded_wait(1, 'the peers did not answer', holds_lock={holds_lock}):\n"
        "    time.sleep(60)\n"
    )
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == status and time.monotonic() - start < 20
    assert done.stderr.strip().splitlines() == [
        "densenet-xf train: error: process 0 lost the other processes of the run (the peers did not answer: no "
        "answer in 1 s); every completed epoch is saved: start all nodes again with --resume"
    ]


def test_a_bounded_wait_that_ends_in_time_changes_nothing():
    with engines.bounded_wait(30, "unused", holds_lock=True), engines.bounded_wait(30, "unused"):
        pass
