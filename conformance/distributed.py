"""Data-parallel training, framework-free: the declared BatchNorm semantics of each engine,
the launcher that starts a process with simulated devices, and the check against the
NumPy reference.

Each backend's `densenet_<fw>/distributed.py` offers DECLARED (its entry of ENGINES below),
DTYPES, `simulate_devices(n)` and `make_trainer(...)` (docs/distributed.md). Simulated CPU
devices must exist before a framework initialises, so data-parallel work runs in a process
of its own, started here:

    python -m conformance.distributed check --backend jax --devices 2 --out dp.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checks, reference
from .backends import BackendUnavailable, load_backend, registered_backends
from .specs import get_spec, is_running_stat, to_layout
from .weights import atomic_write_text, init_state


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
CHECK_ARCH, CHECK_SIZE, CHECK_BATCH, CHECK_STEPS = "tiny", 16, 4, 3
SEMANTICS_APART = 1e-6  # float64: the other semantics' step must differ from ours by more than this
TIMEOUT_S = 1200


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
    if name not in registered_backends():
        raise NoDataParallel(f"backend {name!r} has no data-parallel trainer (only the frameworks have one)")
    package = registered_backends()[name].rsplit(".", 1)[0]
    found = importlib.util.find_spec(package)  # a top-level name: found without importing the framework
    if (
        found
        and found.submodule_search_locations
        and not any((Path(folder) / "distributed.py").is_file() for folder in found.submodule_search_locations)
    ):
        raise NoDataParallel(f"backend {name!r} has no data-parallel trainer ({package}/distributed.py)")
    try:
        return importlib.import_module(f"{package}.distributed")
    except ModuleNotFoundError as error:
        if error.name == f"{package}.distributed":
            raise NoDataParallel(f"backend {name!r} has no data-parallel trainer ({package}/distributed.py)") from None
        if (error.name or "").split(".")[0] == package:
            raise
        raise BackendUnavailable(f"backend {name!r} is not available: {error}") from error
    except ImportError as error:
        raise BackendUnavailable(f"backend {name!r} is not available: {error}") from error


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


# ---------------------------------------------------------------------------------------
# The check against the reference


def _deltas(keys, old, new) -> dict:
    return {key: np.asarray(new[key], np.float64) - np.asarray(old[key], np.float64) for key in keys}


def compare_states(old, new, expected, other) -> dict:
    """Errors of the step old -> new against the reference's old -> expected (and -> other,
    the other BatchNorm semantics' step), for the weights and the running statistics."""
    trainable = [key for key in old if not is_running_stat(key)]
    running = [key for key in old if is_running_stat(key)]
    result = {}
    for label, keys in (("weights", trainable), ("running", running)):
        actual = _deltas(keys, old, new)
        result[label] = checks.worst_error(actual, _deltas(keys, old, expected))
        result[f"{label}_other"] = checks.worst_error(actual, _deltas(keys, old, other))[0]
    return result


def _rows(config, dtype, tolerances, errors, loss=None) -> list[dict]:
    (weights, weights_key), (running, running_key) = errors["weights"], errors["running"]
    rows = []
    if loss is not None:
        rows.append(
            {
                "config": config,
                "dtype": dtype,
                "check": "dp loss",
                **checks.measurement(loss[0], tolerances["loss"], value=loss[1]),
            }
        )
    prefix = "dp one step" if loss is not None else "dp few steps"
    rows.append(
        {
            "config": config,
            "dtype": dtype,
            "check": f"{prefix} sgd_update",
            **checks.measurement(
                weights,
                tolerances["sgd_update"],
                worst_key=weights_key,
                error_under_other_semantics=errors["weights_other"],
            ),
        }
    )
    rows.append(
        {
            "config": config,
            "dtype": dtype,
            "check": f"{prefix} running_stats_update",
            **checks.measurement(
                running,
                tolerances["running_stats_update"],
                worst_key=running_key,
                error_under_other_semantics=errors["running_other"],
            ),
        }
    )
    if dtype == "float64" and loss is not None:  # float32's coarse gradient tolerance cannot tell them apart
        rows.append(
            {
                "config": config,
                "dtype": dtype,
                "check": "dp tells the semantics apart",
                "passed": bool(errors["weights_other"] > SEMANTICS_APART),
                "value": errors["weights_other"],
                "expected": f"> {SEMANTICS_APART}",
            }
        )
    return rows


def check(
    backend,
    module,
    devices: int = 2,
    arch=CHECK_ARCH,
    size: int = CHECK_SIZE,
    batch: int = CHECK_BATCH,
    steps: int = CHECK_STEPS,
    seed: int = 0,
    progress: bool = False,
    dtypes=checks.DTYPES,
) -> list[dict]:
    """Rows (report format) for every BatchNorm semantics the backend declares on this device
    kind and every dtype it allows: one SGD step on a global batch of `batch` split over
    `devices`, then `steps` steps, against the reference's data-parallel step."""
    from tqdm.auto import tqdm

    spec = get_spec(arch).replace(drop_rate=0.0)
    state = init_state(spec, seed, randomize_bn=True)
    lr, momentum = checks.effective_hyperparameters(backend)
    batches = [checks.make_batch(spec, size, batch, seed + k) for k in range(steps)]
    declared = ENGINES[backend.name]
    semantics = declared.bn_semantics.get(device_kind(backend), ())
    jobs = [(sem, dtype) for sem in semantics for dtype in module.DTYPES[sem] if dtype in dtypes]
    rows = []
    for sem, dtype in tqdm(jobs, desc=f"{backend.name} data-parallel check", disable=not progress):
        other = next(s for s in reference.BN_SEMANTICS if s != sem)
        config = f"dp{devices} {spec.name}@{size} {sem}"
        model = backend.build(spec, dtype)
        backend.load_state(model, state)
        trainer = module.make_trainer(backend, model, checks.LR, 0.0, "fp32", devices, sem == "sync")
        for n, (x, y) in enumerate(batches, start=1):  # the first step, then the last of `steps`
            loss = trainer.train_step(to_layout(x, backend.layout).astype(dtype), y)[0]
            if n not in (1, steps):
                continue
            (ours, ref_losses), (theirs, _) = [
                reference.data_parallel_train(
                    spec,
                    state,
                    batches[:n],
                    lr,
                    devices,
                    semantics,
                    declared.running_stats,
                    backend.running_var,
                    momentum,
                )
                for semantics in (sem, other)
            ]
            errors = compare_states(state, backend.export_state(model), ours, theirs)
            first = (checks.relative_error(loss, ref_losses[0]), loss) if n == 1 else None
            rows += _rows(config, dtype, checks.TOLERANCES[dtype], errors, first)
    return rows


# ---------------------------------------------------------------------------------------
# Processes


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


def launch_check(
    name: str,
    out,
    devices: int = 2,
    device: str = "cpu",
    timeout: float = TIMEOUT_S,
    log=None,
    extra: list[str] = (),
    env: dict | None = None,
) -> dict:
    """The data-parallel check of backend `name` in a process of its own; its result dict
    (status ok with rows, skipped with a reason, or error)."""
    out = Path(out)
    args = [
        "-m",
        "conformance.distributed",
        "check",
        "--backend",
        name,
        "--devices",
        str(devices),
        "--device",
        device,
        "--out",
        str(out),
        *extra,
    ]
    for path in (out, Path(log or os.devnull)):
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(log or os.devnull, "w") as stream:
        code = launch(name, devices, args, timeout, env, stdout=stream, stderr=subprocess.STDOUT)
    if out.is_file():
        return json.loads(out.read_text())
    reason = f"timed out after {timeout} s" if code == -1 else f"exited with code {code}"
    return {"status": "error", "reason": f"data-parallel check {reason}" + (f"; log: {log}" if log else "")}


def run_check(args) -> dict:
    try:
        backend, module = prepare(args.backend, args.devices, args.device)
    except BackendUnavailable as error:  # NoDataParallel too
        return {"status": "skipped", "reason": str(error)}
    try:
        rows = check(
            backend,
            module,
            args.devices,
            args.arch,
            args.size,
            args.batch,
            args.steps,
            progress=process_index() == 0,
            dtypes=args.dtypes.split(","),
        )
        training = train_recipe(backend, args.recipe, args.devices, args.train_dir, args.data_dir)
    except Exception as error:
        return {"status": "error", "reason": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    declared = ENGINES[backend.name]
    return {
        "status": "ok",
        "device": backend.device_name,
        "devices": args.devices,
        "engine": declared.engine,
        "bn_semantics": list(declared.bn_semantics.get(device_kind(backend), ())),
        "running_stats": declared.running_stats,
        "running_var": backend.running_var,
        "rows": rows,
        "training": training,
    }


def train_recipe(backend, recipe_name: str, devices: int, run_dir, data_dir=None) -> dict | None:
    """The conformance recipe trained data-parallel (per-shard BatchNorm, which every engine
    runs) in `run_dir`, continuing the run there if it holds one (conformance_phase branches the
    single-device run into it); the summary of its last epoch."""
    from . import training

    if not recipe_name:
        return None
    recipe = training.get_recipe(recipe_name)
    record = training.train(backend, "d2l", recipe, run_dir, data_dir, resume=True, progress=False, devices=devices)
    return {
        "recipe": recipe.name,
        "max_spread": recipe.max_spread,
        **{k: record[k] for k in ("devices", "bn_semantics")},
        "epochs": [
            e["epoch"] for e in record["epochs"] if e["epoch"] > record.get("branched_from", {}).get("epoch", 0)
        ],
        **{k: record["epochs"][-1][k] for k in ("test_acc", "loss", "examples_per_s")},
    }


def conformance_phase(
    name: str, out_dir: Path, device: str, recipe: str = "", data_dir=None, env: dict | None = None
) -> None:
    """`make conformance`'s data-parallel part for backend `name`, after its checks phase:
    the check on 2 devices in a process of its own, which also trains the recipe's last epoch
    on them, continuing the single-device run from the epoch before (a short run whose final
    accuracy is compared with the single-device run's); the rows join the backend's result,
    and a run without distributed.py is noted as skipped."""
    import shutil

    from . import training

    path = out_dir / f"{name}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if data.get("status") != "ok":
        return
    run_dir = out_dir / "data_parallel" / "train-dp" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    single = (data.get("training") or {}).get("epochs") or []
    rows = []
    if recipe and len(single) > 1:
        try:
            training.branch(out_dir / "train" / name, run_dir, len(single) - 1)
        except training.TrainingError as error:  # the single-device run's files are gone or damaged
            rows.append(
                {
                    "config": "dp2",
                    "check": "branch the single-device run",
                    "passed": False,
                    "value": str(error),
                    "expected": "its second-to-last epoch's files",
                }
            )
            recipe, single = "", []  # the check still runs, without the recipe
    extra = ["--recipe", recipe, "--train-dir", str(run_dir)] + (["--data-dir", str(data_dir)] if data_dir else [])
    result = launch_check(
        name,
        out_dir / "data_parallel" / f"{name}.json",
        2,
        device,
        log=out_dir / "logs" / f"{name}.data_parallel.log",
        extra=extra,
        env=env,
    )
    rows += result.get("rows", [])
    parallel = result.get("training")
    if parallel and single:
        difference = abs(parallel["test_acc"] - single[-1]["test_acc"])
        first, last = parallel["epochs"][0], parallel["epochs"][-1]
        epochs = f"epoch {last}" if first == last else f"epochs {first}-{last}"
        rows.append(
            {
                "config": f"dp2 d2l {parallel['recipe']} {parallel['bn_semantics']} {epochs}",
                "check": "dp test accuracy vs 1 device",
                **checks.measurement(difference, parallel["max_spread"], value=parallel["test_acc"]),
            }
        )
    if result["status"] == "error":
        rows.append(
            {
                "config": "dp2",
                "check": "data-parallel check",
                "passed": False,
                "value": result["reason"],
                "expected": "it runs",
            }
        )
    data = json.loads(path.read_text())  # re-read: the worker may have written since
    data.update(rows=data.get("rows", []) + rows, data_parallel={k: v for k, v in result.items() if k != "rows"})
    atomic_write_text(path, json.dumps(data, indent=2, default=float))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.distributed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="job", required=True)
    p = sub.add_parser("check", help="one step and a few steps on N devices against the reference")
    p.add_argument("--backend", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default=CHECK_ARCH)
    p.add_argument("--size", type=int, default=CHECK_SIZE)
    p.add_argument("--batch", type=int, default=CHECK_BATCH)
    p.add_argument("--steps", type=int, default=CHECK_STEPS)
    p.add_argument("--dtypes", default=",".join(checks.DTYPES), help="comma-separated (default: both)")
    p.add_argument("--recipe", default="", help="also train this recipe data-parallel (default: none)")
    # Not --run: torchrun, which passes these on, would take it for its own --run-path.
    p.add_argument("--train-dir", help="the recipe's run directory (needed with --recipe); a run there is continued")
    p.add_argument("--data-dir")
    p.add_argument("--out", required=True, help="result JSON")
    args = parser.parse_args(argv)
    if args.recipe and not args.train_dir:
        parser.error("--recipe needs --train-dir DIR, the run directory to train (or continue) it in")
    result = run_check(args)
    if process_index() == 0:
        atomic_write_text(Path(args.out), json.dumps(result, indent=2, default=float))
        failed = [f"{r['config']} {r['dtype']} {r['check']}" for r in result.get("rows", []) if not r["passed"]]
        print(
            f"{args.backend}: {result['status']}"
            + (f": {result.get('reason')}" if result.get("reason") else "")
            + (f"; FAILED: {', '.join(failed)}" if failed else "")
        )
    if process_index():  # rank 0 judges: between steps DDP's other ranks hold their own statistics
        return 0
    return 1 if result["status"] == "error" or any(not r["passed"] for r in result.get("rows", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
