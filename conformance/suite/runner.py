"""`densenet-xf conformance`: every backend in its own process, then one report.

Each backend runs `python -m conformance.suite.worker` twice (checks, then loading the other
backends' exports), so frameworks never share a process, their CUDA libraries or their GPU
memory. A backend that crashes or times out is reported as failed, and the others go on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import reference, specs, trajectory, weights
from ..backends import backend_names
from ..data import check_readable
from ..files import WriteError, cache_dir, merge_json, read_json, write_json
from ..interface import check_device
from . import checks, parallel, report
from .checks import Config

MATRICES = {
    # The d2l net at the book's 96x96, a bottleneck net, and densenet121 at a size two CPU cores
    # afford. The trainer's step is the same code on every net: it is checked on the d2l net (and
    # by the data-parallel check), not rebuilt for the two big ones. Their train-mode pass is
    # checked in float64, where it must match to near machine precision; float32 checks their
    # eval pass (their float32 conditioning allows only coarse gradient tolerances: docs/numerics.md).
    "default": [
        Config("d2l", 96, 4),
        Config("densenet_bc100_k12", 32, 4, trainer_step=False, float32_training=False),
        Config("densenet121", 64, 2, trainer_step=False, float32_training=False),
    ],
    "tiny": [Config("tiny", 19, 4), Config("tiny_d2l", 13, 4)],
}
# Checked again as memory-efficient models, in every matrix: the cheapest nets with
# both dense-layer kinds (a bottleneck and a plain 3x3 layer) behind the ImageNet stem. What
# recomputing changes is the gradients' pass, and how often it moves the running statistics;
# the trainer's step on top of it is the plain model's.
MEMORY_EFFICIENT = [Config("tiny", 19, 4, trainer_step=False), Config("tiny_d2l", 13, 4, trainer_step=False)]
WORKER_TIMEOUT_S = 1800
# Measured worker time, longest first (docs/results/report.md): started first when workers run concurrently.
SLOWEST_FIRST = ("jax", "tf", "mxnet", "torch")


def worker_env(jobs: int) -> dict:
    """The environment of a worker that shares the cores with `jobs` - 1 others: its share of
    them as OpenMP threads (unless the user set OMP_NUM_THREADS). PyTorch's and MXNet's OpenMP
    threads spin while they wait; with a thread per core each, a torch and an MXNet worker side
    by side took 70 s where they take 50 s with one each (2 cores, measured 2026-11-23)."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}


def _worker(backend: str, phase: str, out_dir: Path, device: str, extra: list[str], env: dict) -> tuple[int, str]:
    log = out_dir / "logs" / f"{backend}.{phase}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "conformance.suite.worker",
        "--backend",
        backend,
        "--phase",
        phase,
        "--out",
        str(out_dir),
        "--device",
        device,
        *extra,
    ]
    with open(log, "w") as stream:
        try:
            code = subprocess.run(
                command, stdout=stream, stderr=subprocess.STDOUT, timeout=WORKER_TIMEOUT_S, env=env
            ).returncode
        except subprocess.TimeoutExpired:
            code = -1
    return code, str(log)


def _record_failure(out_dir: Path, backend: str, phase: str, code: int, log: str) -> None:
    """A worker that died without saying why (crash, timeout) is recorded here."""
    path = out_dir / f"{backend}.json"
    if read_json(path).get("status") in ("error", "skipped"):
        return
    tail = Path(log).read_text(errors="replace")[-2000:] if Path(log).is_file() else ""
    reason = f"timed out after {WORKER_TIMEOUT_S} s" if code == -1 else f"worker exited with code {code}"
    merge_json(
        path, {"status": "error", "phase": phase, "reason": f"{reason} in phase {phase}; log: {log}", "traceback": tail}
    )


def cached_conditioning(config: Config) -> dict:
    """checks.float32_conditioning of one net, kept in the cache directory under a name that
    changes with the code that measures it (the d2l net's takes ~13 s on two cores)."""
    source = b"".join(Path(module.__file__).read_bytes() for module in (checks, reference, specs, weights))
    key = hashlib.sha256(source + json.dumps([config.arch, config.size, config.batch]).encode()).hexdigest()[:16]
    path = cache_dir() / "conditioning" / f"{config.arch}-{config.size}-{config.batch}-{key}.json"
    if path.is_file():
        return read_json(path)
    result = checks.float32_conditioning(config.arch, config.size, config.batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return result


def check_inputs(out_dir: Path, recipe: str, data_dir=None) -> None:
    """Fail in seconds, before any worker starts: Fashion-MNIST readable when training is on,
    the output directory writable."""
    if recipe:
        check_readable(data_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} exists and is not a directory")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir.parent):
            pass
    except OSError as error:
        raise WriteError(error.errno, f"--out {out_dir} cannot be written: {error.strerror or error}") from None


def run(
    out_dir="build/conformance",
    device="cpu",
    backends=None,
    matrix="default",
    recipe=None,
    data_dir=None,
    require_all=False,
    publish=None,
    jobs=None,
    data_parallel=True,
) -> int:
    check_device(device)
    # Two workers share two CPU cores well; on a GPU they would share its memory, which TF and
    # JAX each take most of when they start: one at a time there.
    jobs = jobs or (1 if device == "gpu" else 2)
    out_dir = Path(out_dir)
    recipe = ("d2l" if device == "gpu" else "quick") if recipe is None else recipe
    check_inputs(out_dir, recipe, data_dir)
    backends = list(backends or backend_names())
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    configs = MATRICES[matrix]
    env = worker_env(jobs)
    started = time.time()

    print(
        f"conformance: {len(backends)} backends, matrix {matrix}, device {device}, training recipe {recipe or 'none'}, "
        f"{jobs} worker(s) at a time" + ("" if data_parallel else ", no data-parallel check")
    )
    # The reference's own float32 conditioning: the float32 gradient tolerances of the nets whose
    # float32 train-mode pass is checked, measured once before the workers need them; the other
    # nets' (for the report) in NumPy while the workers run.
    checked = {f"{c.arch}@{c.size}": c for c in [*configs, *MEMORY_EFFICIENT] if c.float32_training}
    conditioning = {label: cached_conditioning(c) for label, c in checked.items()}
    reference_thread = ThreadPoolExecutor(1)
    sensitivity = reference_thread.submit(
        lambda: {
            f"{c.arch}@{c.size}": conditioning.get(f"{c.arch}@{c.size}") or cached_conditioning(c) for c in configs
        }
    )
    if recipe:  # the reference's float64 trajectory, kept for the report: NumPy, while the workers run
        reference_trajectory = reference_thread.submit(
            trajectory.reference_runs,
            trajectory.get_setup(trajectory.CONFORMANCE),
            out_dir / "trajectory",
            data_dir,
        )
    extra = [
        "--matrix",
        json.dumps(configs),
        "--memory-efficient",
        json.dumps(MEMORY_EFFICIENT),
        "--conditioning",
        json.dumps(conditioning),
        "--recipe",
        recipe or "",
    ] + (["--data-dir", str(data_dir)] if data_dir else [])

    def checks_phase(name):
        t = time.time()
        print(f"  {name}: shapes, parameters, reference checks" + (", training" if recipe else "") + " ...", flush=True)
        code, log = _worker(name, "checks", out_dir, device, extra, env)
        if code != 0:
            _record_failure(out_dir, name, "checks", code, log)
        if matrix == "default" and data_parallel:  # 2 devices against the reference (docs/distributed.md)
            parallel.conformance_phase(name, out_dir, device, recipe or "", data_dir, env)
        print(f"  {name}: {_status(out_dir, name)} ({time.time() - t:.0f} s)", flush=True)

    _each(backends, jobs, checks_phase)

    exports = {
        name: data["export"]
        for name, data in report.load_results(out_dir, backends).items()
        if data.get("status") == "ok" and "export" in data
    }

    def cross_phase(name):
        code, log = _worker(name, "cross", out_dir, device, ["--exports", json.dumps(exports)], env)
        if code != 0:
            _record_failure(out_dir, name, "cross", code, log)

    _each(list(exports), jobs, cross_phase)

    if recipe:
        reference_trajectory.result()
    result = report.build(
        out_dir,
        backends,
        configs,
        device,
        recipe,
        sensitivity.result(),
        require_all,
        seconds=time.time() - started,
        jobs=jobs,
        memory_efficient=MEMORY_EFFICIENT,
    )
    reference_thread.shutdown()
    report.write(out_dir, result)
    print(report.summary_text(result))
    print(f"report: {out_dir / 'report.md'} (and report.json, *.png)")
    if publish:
        report.publish(out_dir, Path(publish))
        print(f"published to {publish}")
    return 0 if result["passed"] else 1


def _each(backends: list[str], jobs: int, phase) -> None:
    """`phase(name)` for every backend, `jobs` worker processes at a time, the slowest backends
    first so that one compiling (JAX, TF) overlaps with the others' work."""
    order = sorted(
        backends, key=lambda name: SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)
    )
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(phase, name) for name in order]:
            future.result()


def _status(out_dir: Path, name: str) -> str:
    data = report.load_results(out_dir, [name]).get(name, {})
    if data.get("status") != "ok":
        return f"{data.get('status', 'error')}: {data.get('reason', 'no result')}"
    failed = [
        f"{row['config']} {row.get('dtype', '')} {row['check']}".replace("  ", " ")
        for row in data.get("rows", [])
        if not row["passed"]
    ]
    return "all checks passed" if not failed else f"FAILED: {', '.join(failed)}"
