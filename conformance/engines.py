"""Data-parallel engines, framework-free: what each framework's engine runs (its declared
BatchNorm semantics and running-statistics rule), the launcher that starts a process with
simulated devices, and the cluster of several processes ("nodes") that talk over TCP.

Each backend's `densenet_<fw>/distributed.py` offers DECLARED (its entry of ENGINES below),
DTYPES, `simulate_devices(n)` and `make_trainer(...)` (docs/distributed.md). Simulated CPU
devices must exist before a framework initialises, so data-parallel work runs in a process
of its own, started by `launch`. The check against the reference is conformance.suite.parallel.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from .backends import BackendUnavailable, backend_module, lacks_module, load_backend, registered_backends


@dataclass(frozen=True)
class Engine:
    """One framework's data-parallel engine, as documented (docs/distributed.md)."""

    engine: str
    bn_semantics: dict  # device kind -> the BatchNorm semantics it runs (reference.BN_SEMANTICS)
    running_stats: str  # what per-shard running statistics become (reference.RUNNING_STATS_RULES)
    multi_node: str  # the command that launches it across machines
    multi_process: str = ""  # how `train --nodes N` runs it; empty: not wired


# What each engine runs, declared once: each backend's distributed.py reads its own entry (DECLARED).
ENGINES = {
    "torch": Engine(
        "DistributedDataParallel (gloo on CPUs, NCCL on GPUs)",
        {"cpu": ("per_shard",), "gpu": ("per_shard", "sync")},
        "rank0",
        "densenet-xf train --backend torch --nodes 2 --node-rank I --coordinator HOST0:29500 --devices GPUS "
        "(runs torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 on each machine)",
        "torchrun per node (c10d rendezvous at --coordinator, hosted by node 0), DDP over gloo",
    ),
    "mxnet": Engine(
        "gluon.Trainer(kvstore='device') over several contexts; across processes kvstore 'dist_sync'",
        {"cpu": ("per_shard",), "gpu": ("per_shard",)},
        "per_device",
        "densenet-xf train --backend mxnet --nodes 2 --node-rank I --coordinator HOST0:9091 "
        "(every node runs a worker with DMLC_ROLE=worker DMLC_PS_ROOT_URI=HOST0 DMLC_PS_ROOT_PORT=9091 "
        "DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2; node 0 also runs the scheduler and the server, "
        "DMLC_ROLE=scheduler|server)",
        "one worker per node on the dist_sync kvstore (ps-lite), node 0 also running its scheduler "
        "at --coordinator and its one server",
    ),
    "tf": Engine(
        "tf.distribute.MirroredStrategy; across processes MultiWorkerMirroredStrategy",
        {"cpu": ("per_shard", "sync"), "gpu": ("per_shard", "sync")},
        "rank0",
        "densenet-xf train --backend tf --nodes 2 --node-rank I --coordinator HOST0:12345 "
        '--workers HOST0:12345,HOST1:12345 (sets TF_CONFIG=\'{"cluster": {"worker": '
        '["HOST0:12345", "HOST1:12345"]}, "task": {"type": "worker", "index": I}}\' '
        "on each machine for MultiWorkerMirroredStrategy)",
        "MultiWorkerMirroredStrategy from TF_CONFIG (worker I at --workers' I-th address; default "
        "the coordinator's host, port + I), ring collectives over gRPC",
    ),
    "jax": Engine(
        "jax.jit with a NamedSharding over jax.make_mesh (per-shard BatchNorm: jax.shard_map)",
        {"cpu": ("sync", "per_shard"), "gpu": ("sync", "per_shard")},
        "mean",
        "densenet-xf train --backend jax --nodes 2 --node-rank I --coordinator HOST0:1234 "
        "(calls jax.distributed.initialize('HOST0:1234', num_processes=2, process_id=I) on each machine)",
        "jax.distributed.initialize at --coordinator (node 0 hosts the service), CPU collectives over gloo",
    ),
}
# What goes between `python` and `-m module` to start one data-parallel job: PyTorch runs one
# process per device (torchrun: every rank runs the same job); the others one process.
LAUNCHERS = {"torch": ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "{devices}")}
# Several nodes (`train --nodes N`): PyTorch's launcher on each node joins the others at the
# coordinator (c10d rendezvous; node 0 hosts the store). The rendezvous hands out the global
# ranks in the order the nodes arrive: node 0's processes need not be ranks 0..D-1.
CLUSTER_LAUNCHERS = {
    "torch": (
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "{nodes}",
        "--nproc-per-node",
        "{devices}",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "{host}:{port}",
        "--rdzv-id",
        "densenet-xf",
        "--rdzv-conf",
        "is_host={is_host},join_timeout={join_timeout}",
        "--max-restarts",
        "0",
    )
}
# Engines whose every node listens at an address of its own (Cluster.workers): TensorFlow's
# workers are each a gRPC server, named in TF_CONFIG.
OWN_ADDRESS = {"tf"}
# MXNet's parameter server (ps-lite): every process finds the scheduler at the coordinator
# through DMLC_* variables; node 0 runs the scheduler and the one server beside its worker,
# each a Python that imports mxnet with DMLC_ROLE set (the import serves that role until the
# workers finish; MXNet's own tools/launch.py fails on Python 3.11+).
PARAMETER_SERVERS = {"mxnet": ("-c", "import densenet_mxnet.compat")}
LAUNCHED_ENV = "DENSENET_XF_LAUNCHED"  # set in a launched process: it must not launch again
# Timeouts, chosen: a node waits at most JOIN_TIMEOUT_S for the others to arrive (a cold
# framework import on a loaded machine takes tens of seconds); a collective whose peer is
# gone fails at once on a closed connection, and at most COLLECTIVE_TIMEOUT_S after the
# peer stops answering (a first step that compiles while the peer waits must fit in it);
# JAX's coordination service declares a silent process dead after HEARTBEAT_TIMEOUT_S.
JOIN_TIMEOUT_S = 120
COLLECTIVE_TIMEOUT_S = 120
HEARTBEAT_TIMEOUT_S = 30
# How long node 0 lets MXNet's scheduler and server finish after its worker has ended.
SERVICE_GRACE_S = 10
# Fault rehearsal: "RANK:EPOCH:STEP" makes the process of that global rank kill itself
# (SIGKILL) after that optimiser step of that epoch, as a machine lost mid-epoch would.
KILL_ENV = "DENSENET_XF_KILL_AT"


@dataclass(frozen=True)
class Cluster:
    """Where this process stands among `nodes` nodes of `devices` devices each."""

    nodes: int = 1
    node_rank: int = 0
    host: str = "127.0.0.1"
    port: int = 0
    devices: int = 1  # per node
    workers: tuple = ()  # every node's own HOST:PORT, where the engine needs them (TensorFlow)

    @property
    def world(self) -> int:
        """The global number of replicas."""
        return self.nodes * self.devices

    @property
    def coordinator(self) -> str:
        return f"{self.host}:{self.port}"


def parse_coordinator(text: str) -> tuple[str, int]:
    """HOST:PORT, or a ValueError saying what was expected."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator {text!r} is not HOST:PORT (a host name or address, a port 1-65535)")
    return host, int(port)


def parse_workers(text: str, nodes: int) -> tuple:
    """--workers HOST0:PORT0,HOST1:PORT1,...: one address per node, or a ValueError."""
    workers = tuple(part.strip() for part in text.split(",") if part.strip())
    if len(workers) != nodes:
        raise ValueError(f"--workers names {len(workers)} address(es) for --nodes {nodes}: give one HOST:PORT per node")
    for worker in workers:
        host, _, port = worker.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--workers: {worker!r} is not HOST:PORT (a host name or address, a port 1-65535)")
    return workers


def make_cluster(
    nodes: int, node_rank: int, coordinator: str | None, devices: int, workers: str | None = None
) -> Cluster:
    """The cluster the command line asks for, or a ValueError saying what is missing. Every
    node's own address (`workers`) defaults to the coordinator's host, at its port + the node's
    rank (several nodes on one machine); node 0's is the coordinator."""
    if node_rank >= nodes:
        raise ValueError(f"--node-rank {node_rank} is not below --nodes {nodes} (ranks count from 0)")
    if nodes == 1:
        return Cluster(devices=devices)
    if not coordinator:
        raise ValueError(f"--nodes {nodes} needs --coordinator HOST:PORT (node 0's address, the same on every node)")
    host, port = parse_coordinator(coordinator)
    if workers:
        addresses = parse_workers(workers, nodes)
        if addresses[0] != f"{host}:{port}":
            raise ValueError(
                f"--workers starts with {addresses[0]}, but node 0's address is --coordinator {host}:{port}"
            )
    else:
        addresses = tuple(f"{host}:{port + rank}" for rank in range(nodes))
        if port + nodes - 1 > 65535:
            raise ValueError(f"--coordinator port {port} leaves no port for each of {nodes} nodes (port + rank)")
    return Cluster(nodes, node_rank, host, port, devices, addresses)


def check_cluster(name: str, cluster: Cluster) -> None:
    """Refuse, before anything starts, a cluster the backend cannot run or node 0 cannot host."""
    if cluster.nodes == 1:
        return
    engine = ENGINES.get(name)
    if engine is None or not engine.multi_process:
        wired = ", ".join(b for b, e in ENGINES.items() if e.multi_process)
        raise ValueError(
            f"{name} has no multi-process training wired (--nodes); backends that have: {wired} (docs/distributed.md)"
        )
    if cluster.node_rank == 0:
        check_port_free(cluster.host, cluster.port)
    elif name in OWN_ADDRESS:
        host, _, port = cluster.workers[cluster.node_rank].rpartition(":")
        check_port_free(host, int(port), f"node {cluster.node_rank}'s worker port", "--workers")


def check_port_free(host: str, port: int, what: str = "the coordinator port", option: str = "--coordinator") -> None:
    """Node 0 hosts the coordinator (and, where OWN_ADDRESS, every node listens at its own
    address): the port must be free."""
    where = "on node 0" if option == "--coordinator" else "on this node"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(
                f"{what} {host}:{port} cannot be used {where} ({error.strerror or error}); "
                f"it is already in use or not this machine's address: choose another {option}"
            ) from None


def shard_of(batch, rank: int, world: int):
    """Global rank `rank`'s part of a global batch: the rank-th of `world` contiguous, equal parts."""
    size = len(batch) // world
    return batch[rank * size : (rank + 1) * size]


def kill_hook():
    """on_step for training.train: SIGKILL this process at the step KILL_ENV names (None: none named)."""
    target = os.environ.get(KILL_ENV)
    if not target:
        return None
    rank, epoch, step = (int(part) for part in target.split(":"))

    def on_step(at_epoch, at_step):
        if process_index() == rank and (at_epoch, at_step) == (epoch, step):
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step


class PeerLost(RuntimeError):
    """Another process of a multi-process run stopped answering."""


def peer_lost_message(rank: int, cause: str) -> str:
    return (
        f"process {rank} lost the other processes of the run ({cause}); every completed epoch is "
        "saved: start all nodes again with --resume"
    )


@contextmanager
def peers_guarded(lost, rank: int, cause=None):
    """An error that `lost(error)` (the backend's test) says came from a peer gone becomes
    PeerLost, one clear line (`cause(error)`: the line of the error that says why; default
    its first); any other passes as it is."""
    try:
        yield
    except Exception as error:
        if not lost(error):
            raise
        why = cause(error) if cause else str(error).strip().splitlines()[0]
        raise PeerLost(peer_lost_message(rank, why[:300])) from None


@contextmanager
def bounded_wait(seconds: float, what: str, holds_lock: bool = False):
    """A wait that a lost peer would make endless (an engine that never fails a blocked call),
    bounded: if the block has not ended after `seconds`, the process says PeerLost's line and
    ends at once, with status 2 (os._exit: no thread can interrupt a call blocked inside a
    framework's C++, and the framework's own shutdown would wait for the lost peer again).
    A call that `holds_lock` (Python's interpreter lock: no thread of this process runs until
    it returns) is watched from a process of its own, which ends this one with SIGKILL."""
    message = f"densenet-xf train: error: {peer_lost_message(process_index(), f'{what}: no answer in {seconds:.0f} s')}"
    if holds_lock:
        watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid()), str(seconds), message])
        try:
            yield
        finally:
            watchdog.kill()
            watchdog.wait()
        return

    def give_up():
        print(message, file=sys.stderr, flush=True)
        os._exit(2)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# bounded_wait's watchdog process: after SECONDS, say MESSAGE and SIGKILL process PID.
WATCHDOG = """import os, signal, sys, time
pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
time.sleep(seconds)
print(message, file=sys.stderr, flush=True)
os.kill(pid, signal.SIGKILL)
"""


class NoDataParallel(BackendUnavailable):
    """The backend has no data-parallel trainer (no distributed.py)."""


def process_index() -> int:
    """This process's global rank (torchrun sets RANK, `launch` for a JAX node); only process
    0 writes files and prints."""
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """Whether this process was started for data-parallel work (by `launch`, or by torchrun)."""
    return os.environ.get(LAUNCHED_ENV) == "1" or "WORLD_SIZE" in os.environ


def even_part(indices, devices: int):
    """The first multiple of `devices` of a batch's indices: a last batch that does not split
    evenly loses at most devices - 1 examples (PyTorch's DistributedSampler(drop_last=True))."""
    return indices[: len(indices) - len(indices) % devices]


def bn_semantics(sync_bn: bool) -> str:
    return "sync" if sync_bn else "per_shard"


def check_semantics(declared: dict, device_kind: str, sync_bn: bool, backend: str) -> str:
    """The semantics `sync_bn` asks for, or a ValueError saying what the engine can run here."""
    wanted, offered = bn_semantics(sync_bn), declared.get(device_kind, ())
    if wanted not in offered:
        raise ValueError(
            f"{backend} cannot run {wanted} BatchNorm on {device_kind} devices; it runs: "
            f"{', '.join(offered) or 'none'} (sync: pass --sync-bn; per_shard: leave it out)"
        )
    return wanted


def module_of(name: str):
    """Backend `name`'s distributed module; NoDataParallel if it has none, BackendUnavailable
    if its framework is missing."""
    missing = NoDataParallel(f"backend {name!r} has no data-parallel trainer (no distributed.py beside its backend.py)")
    if name not in registered_backends() or lacks_module(name, "distributed"):
        raise missing
    try:
        return backend_module(name, "distributed")
    except ModuleNotFoundError as error:  # raised as is only for a module of the backend's own package
        raise missing from error


def prepare(name: str, devices: int, device: str = "cpu", cluster: Cluster | None = None):
    """In a fresh process: simulate `devices` CPU devices (on the CPU; this node's, in a
    cluster), join the cluster's other processes, then load the backend.
    Returns (backend, its distributed module)."""
    module = module_of(name)
    if device == "cpu":
        module.simulate_devices(cluster.devices if cluster else devices)
    if cluster and cluster.nodes > 1:
        module.join_cluster(cluster)
    return load_backend(name, device), module


def device_kind(backend) -> str:
    return "cpu" if backend.device_name.startswith("cpu") else "gpu"


def make_trainer(backend, model, lr, momentum=0.0, precision="fp32", devices=2, sync_bn=False):
    """The backend's data-parallel trainer (in a process made by `prepare`)."""
    if devices < 2:
        raise ValueError(f"data parallelism needs at least 2 devices, got {devices}")
    return module_of(backend.name).make_trainer(backend, model, lr, momentum, precision, devices, sync_bn)


def describe(trainer) -> dict:
    """What a run's metrics.json records about its data parallelism."""
    return {
        "devices": getattr(trainer, "devices", 1),
        "bn_semantics": getattr(trainer, "bn_semantics", "sync"),
        "running_stats": getattr(trainer, "running_stats", None),
        "engine": getattr(trainer, "engine", None),
    }


def command(name: str, devices: int, module_args: list[str], cluster: Cluster | None = None) -> list[str]:
    """`python [launcher] -m ...` for backend `name` on `devices` devices (this node's, in a cluster)."""
    if cluster and cluster.nodes > 1:
        fields = {
            "nodes": cluster.nodes,
            "node_rank": cluster.node_rank,
            "devices": cluster.devices,
            "host": cluster.host,
            "port": cluster.port,
            "is_host": int(cluster.node_rank == 0),
            "join_timeout": JOIN_TIMEOUT_S,
        }
        launcher = [part.format(**fields) for part in CLUSTER_LAUNCHERS.get(name, ())]
    else:
        launcher = [part.format(devices=devices) for part in LAUNCHERS.get(name, ())]
    return [sys.executable, *launcher, *module_args]


def dmlc_env(cluster: Cluster, role: str) -> dict:
    """The DMLC_* variables of one ps-lite process (`role`: scheduler, server or worker)."""
    return {
        "DMLC_ROLE": role,
        "DMLC_PS_ROOT_URI": cluster.host,
        "DMLC_PS_ROOT_PORT": str(cluster.port),
        "DMLC_NUM_SERVER": "1",
        "DMLC_NUM_WORKER": str(cluster.nodes),
    }


def launch(
    name: str,
    devices: int,
    module_args: list[str],
    timeout: float | None = None,
    env: dict | None = None,
    cluster: Cluster | None = None,
    **run_kwargs,
) -> int:
    """Run `-m module_args` for backend `name` in a fresh process (or torchrun's processes),
    in `env` (default: this process's environment); in a cluster, as its node `node_rank`."""
    env = {**(env or os.environ), LAUNCHED_ENV: "1", "PYTHONUNBUFFERED": "1"}
    services = []
    if cluster and cluster.nodes > 1 and name not in CLUSTER_LAUNCHERS:  # one process per node
        env["RANK"] = str(cluster.node_rank)
    if cluster and cluster.nodes > 1 and name in PARAMETER_SERVERS:
        env.update(dmlc_env(cluster, "worker"))
        if cluster.node_rank == 0:
            serve = [sys.executable, *PARAMETER_SERVERS[name]]
            services = [
                subprocess.Popen(serve, env={**env, **dmlc_env(cluster, role)}) for role in ("scheduler", "server")
            ]
    try:
        return subprocess.run(
            command(name, devices, module_args, cluster), env=env, timeout=timeout, **run_kwargs
        ).returncode
    except subprocess.TimeoutExpired:
        return -1
    finally:  # the scheduler and server end once every worker has; not when a worker was lost
        for service in services:
            try:
                service.wait(timeout=SERVICE_GRACE_S)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait()
