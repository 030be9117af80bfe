"""Data-parallel engines, framework-free: what each framework's engine runs (its declared
BatchNorm semantics and running-statistics rule), and the launcher that starts a process
with simulated devices.

Each backend's `densenet_<fw>/distributed.py` offers DECLARED (its entry of ENGINES below),
DTYPES, `simulate_devices(n)` and `make_trainer(...)` (docs/distributed.md). Simulated CPU
devices must exist before a framework initialises, so data-parallel work runs in a process
of its own, started by `launch`. The check against the reference is conformance.suite.parallel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from .backends import BackendUnavailable, backend_module, lacks_module, load_backend, registered_backends


@dataclass(frozen=True)
class Engine:
    """One framework's data-parallel engine, as documented (docs/distributed.md)."""

    engine: str
    bn_semantics: dict  # device kind -> the BatchNorm semantics it runs (reference.BN_SEMANTICS)
    running_stats: str  # what per-shard running statistics become (reference.RUNNING_STATS_RULES)
    multi_node: str  # the command that launches it across machines


# What each engine runs, declared once: each backend's distributed.py reads its own entry (DECLARED).
ENGINES = {
    "torch": Engine(
        "DistributedDataParallel (gloo on CPUs, NCCL on GPUs)",
        {"cpu": ("per_shard",), "gpu": ("per_shard", "sync")},
        "rank0",
        "torchrun --nnodes=2 --nproc-per-node=GPUS --rdzv-backend=c10d --rdzv-endpoint=HOST0:29500 "
        "-m conformance train --backend torch --devices N",
    ),
    "mxnet": Engine(
        "gluon.Trainer(kvstore='device') over several contexts",
        {"cpu": ("per_shard",), "gpu": ("per_shard",)},
        "per_device",
        "DMLC_ROLE=scheduler|server|worker DMLC_PS_ROOT_URI=HOST0 DMLC_PS_ROOT_PORT=9091 "
        "DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2 python -m conformance train --backend mxnet ... "
        "(kvstore dist_sync; one process per role and machine; documented, not wired into "
        "the trainer yet)",
    ),
    "tf": Engine(
        "tf.distribute.MirroredStrategy",
        {"cpu": ("per_shard", "sync"), "gpu": ("per_shard", "sync")},
        "rank0",
        'TF_CONFIG=\'{"cluster": {"worker": ["HOST0:12345", "HOST1:12345"]}, '
        '"task": {"type": "worker", "index": I}}\' python -m conformance train --backend tf ... '
        "(MultiWorkerMirroredStrategy, one process per machine)",
    ),
    "jax": Engine(
        "jax.jit with a NamedSharding over jax.make_mesh (per-shard BatchNorm: jax.shard_map)",
        {"cpu": ("sync", "per_shard"), "gpu": ("sync", "per_shard")},
        "mean",
        "jax.distributed.initialize(coordinator_address='HOST0:1234', num_processes=2, process_id=I) "
        "at the start of each machine's process, then the same jit over jax.devices()",
    ),
}
# What goes between `python` and `-m module` to start one data-parallel job: PyTorch runs one
# process per device (torchrun: every rank runs the same job); the others one process.
LAUNCHERS = {"torch": ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "{devices}")}
LAUNCHED_ENV = "DENSENET_XF_LAUNCHED"  # set in a launched process: it must not launch again


class NoDataParallel(BackendUnavailable):
    """The backend has no data-parallel trainer (no distributed.py)."""


def process_index() -> int:
    """This process's rank (torchrun sets RANK); only process 0 writes files and prints."""
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


def prepare(name: str, devices: int, device: str = "cpu"):
    """In a fresh process: simulate `devices` CPU devices (on the CPU), then load the backend.
    Returns (backend, its distributed module)."""
    module = module_of(name)
    if device == "cpu":
        module.simulate_devices(devices)
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


def command(name: str, devices: int, module_args: list[str]) -> list[str]:
    """`python [launcher] -m ...` for backend `name` on `devices` devices."""
    launcher = [part.format(devices=devices) for part in LAUNCHERS.get(name, ())]
    return [sys.executable, *launcher, *module_args]


def launch(
    name: str, devices: int, module_args: list[str], timeout: float | None = None, env: dict | None = None, **run_kwargs
) -> int:
    """Run `-m module_args` for backend `name` in a fresh process (or torchrun's processes),
    in `env` (default: this process's environment)."""
    env = {**(env or os.environ), LAUNCHED_ENV: "1", "PYTHONUNBUFFERED": "1"}
    try:
        return subprocess.run(command(name, devices, module_args), env=env, timeout=timeout, **run_kwargs).returncode
    except subprocess.TimeoutExpired:
        return -1
