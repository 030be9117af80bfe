"""The GPU check's phases, in order of what matters most, within one budget (480 s by default):

1. environment: the GPUs (nvidia-smi), every framework's version, where each backend computes,
   and its trainer's seconds per step at the d2l recipe's size and batch;
2. conformance: `densenet-xf conformance --device gpu` for the backends (exact arithmetic; no
   training, no data-parallel check on one GPU);
3. train-<backend>: the d2l recipe, all 10 epochs if they fit (estimated from the measured
   seconds per step, then from the epochs measured), else as many as fit, resumed in chunks;
4. bench-speed: `make bench`'s speed section (the d2l anchor, fp32, tf32, bf16);
5. bench-memory: densenet121 plain against memory-efficient, if time is left.

    python -m conformance.gpucheck [--out build/gpu-check] [--budget 480] [--backends torch,jax]
    python -m conformance.gpucheck --rehearse      # the same phases, tiny sizes, on the CPU
    python -m conformance.gpucheck.publish build/gpu-check docs/results/gpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import environment
from ..backends import check_backend_name
from ..files import atomic_write_text
from ..interface import PRECISIONS
from ..training import get_recipe
from . import summary
from .timebox import Phase, PhaseContext, run_phases

CHECKOUT = Path(__file__).resolve().parents[2]
DEFAULT_BUDGET_S = 480
DEFAULT_BACKENDS = ("torch", "jax")
EPOCH_MARGIN = 1.1  # an epoch's estimate, over its steps' measured time (evaluation, the commit)
START_MARGIN_S = 15.0  # a training process's start before its first step (imports, data, model)


@dataclass(frozen=True)
class Sizes:
    """What each phase runs at: the GPU's real sizes, or the rehearsal's tiny ones."""

    device: str
    recipe: str
    train_args: tuple[str, ...]  # overrides of the recipe for `densenet-xf train`
    epochs: int  # planned
    conformance_args: tuple[str, ...]
    speed_args: tuple[str, ...]
    memory_args: tuple[str, ...]
    probe_args: tuple[str, ...]


GPU = Sizes(
    device="gpu",
    recipe="d2l",
    train_args=(),
    epochs=get_recipe("d2l").epochs,
    conformance_args=(),
    speed_args=("--arch", "d2l", "--size", "96", "--batch", "256", "--examples", "60000"),
    memory_args=(),  # densenet121 at 224x224, batch 128: bench's GPU memory shape
    probe_args=(),
)
REHEARSAL = Sizes(
    device="cpu",
    recipe="quick",
    train_args=("--train-examples", "256", "--test-examples", "500", "--size", "32", "--batch-size", "64"),
    epochs=4,
    conformance_args=("--matrix", "tiny"),
    speed_args=("--arch", "tiny_d2l", "--size", "16", "--batch", "8", "--examples", "64", "--quick"),
    memory_args=("--arch", "tiny", "--size", "29", "--batch", "4", "--examples", "16", "--quick"),
    probe_args=("--size", "32", "--batch-size", "64", "--steps", "3"),
)


def python_env() -> dict:
    """The environment of every process started: this checkout first on the import path."""
    path = os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "conformance", *args]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------
# The phases


def host_facts(context: PhaseContext) -> dict:
    facts = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        models = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        facts["cpu"] = models[0] if models else platform.processor()
    except OSError:
        facts["cpu"] = platform.processor()
    try:
        facts["commit"] = subprocess.run(
            ["git", "-C", str(CHECKOUT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        facts["commit"] = ""
    if shutil.which("nvidia-smi"):
        query = "index,name,driver_version,memory.total,compute_cap"
        command = context.command(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], "nvidia-smi", timeout=30
        )
        lines = (context.out_dir / command.log).read_text(errors="replace").strip().splitlines()
        keys = query.split(",")
        facts["gpus"] = [dict(zip(keys, (v.strip() for v in line.split(",")))) for line in lines if "," in line]
    else:
        facts["gpus"] = []
        facts["gpus_note"] = "nvidia-smi not found"
    return facts


def environment_phase(sizes: Sizes, backends, precision: str):
    def run(context: PhaseContext) -> dict:
        result = {"host": host_facts(context), "packages": environment.report()}
        atomic_write_text(context.out_dir / "environment.json", json.dumps(result, indent=2))
        for index, name in enumerate(backends):
            out = context.out_dir / "environment" / f"{name}.json"
            argv = [sys.executable, "-m", "conformance.gpucheck.probe", "--backend", name, "--device", sizes.device]
            argv += ["--out", str(out), "--recipe", sizes.recipe, "--precision", precision, *sizes.probe_args]
            context.command(argv, f"probe-{name}", timeout=context.left() / (len(backends) - index))
            result[name] = read_json(out) or {"status": "error", "reason": f"no result; see logs/probe-{name}.log"}
            atomic_write_text(context.out_dir / "environment.json", json.dumps(result, indent=2))
        return {"files": ["environment.json"]}

    return run


def conformance_phase(sizes: Sizes, backends):
    def run(context: PhaseContext) -> dict:
        out = context.out_dir / "conformance"
        argv = cli("conformance", "--device", sizes.device, "--backends", ",".join(backends), "--recipe", "none")
        argv += ["--no-data-parallel", "--jobs", "1", "--out", str(out), *sizes.conformance_args]
        context.command(argv, "conformance")
        report = read_json(out / "report.json")
        if report is None:  # stopped before the report: each backend's own file has what it measured
            partial = {name: (read_json(out / f"{name}.json") or {}).get("status", "not started") for name in backends}
            return {"report": None, "backends": partial}
        return {"report": "conformance/report.md", "passed": report["passed"], "failures": report["failures"][:20]}

    return run


def estimate_epochs(left_s: float, planned: int, done: int, epoch_s: float | None, start_s: float) -> int:
    """How many epochs in all to ask the next training process for: all `planned` if they fit
    in `left_s`, else as many as fit (at least one more when none is done yet), never fewer than `done`."""
    if epoch_s is None or epoch_s <= 0:
        return min(planned, done + 1)
    fit = math.floor((left_s - start_s) / epoch_s)
    if done == 0:
        fit = max(fit, 1)
    return min(planned, done + max(fit, 0))


def epoch_seconds(epochs: list[dict], probe: dict | None, steps: int, margin: float = EPOCH_MARGIN) -> float | None:
    """An epoch's estimated seconds: the slowest measured epoch after the first (whose steps
    include compiling), else the first, else the probe's seconds per step times the steps."""
    measured = [e["seconds"] for e in epochs[1:]] or [e["seconds"] for e in epochs[:1]]
    if measured:
        return margin * max(measured)
    step = ((probe or {}).get("step_time") or {}).get("step_s")
    return None if step is None else margin * step * steps


def train_phase(sizes: Sizes, backend: str, precision: str):
    recipe = get_recipe(sizes.recipe)
    overrides = dict(zip(sizes.train_args[::2], sizes.train_args[1::2]))
    train_examples = int(overrides.get("--train-examples", recipe.train_examples or 60000))
    batch = int(overrides.get("--batch-size", recipe.batch_size))
    steps = math.ceil(train_examples / batch)

    def run(context: PhaseContext) -> dict:
        run_dir = context.out_dir / "train" / backend
        shutil.rmtree(run_dir, ignore_errors=True)
        probe = read_json(context.out_dir / "environment" / f"{backend}.json")
        step_time = (probe or {}).get("step_time") or {}
        start_s = START_MARGIN_S + step_time.get("first_step_s", 0.0) + (probe or {}).get("import_s", 0.0)
        epochs, estimates = [], []
        while len(epochs) < sizes.epochs:
            per_epoch = epoch_seconds(epochs, probe, steps)
            target = estimate_epochs(context.left(), sizes.epochs, len(epochs), per_epoch, start_s)
            if target <= len(epochs):
                break
            estimates.append({"left_s": round(context.left(), 1), "epoch_s": per_epoch, "epochs": target})
            argv = cli("train", "--backend", backend, "--recipe", sizes.recipe, "--device", sizes.device)
            argv += ["--precision", precision, "--epochs", str(target), "--out", str(run_dir), "--quiet"]
            argv += [*sizes.train_args] + (["--resume"] if epochs else [])
            command = context.command(argv, f"train-{backend}-{len(estimates)}")
            record = read_json(run_dir / "metrics.json") or {}
            new = record.get("epochs", [])
            # What this process spent outside its epochs' steps: the next one's start estimate.
            start_s = max(0.0, command.seconds - sum(e["seconds"] for e in new[len(epochs) :]))
            progressed = len(new) > len(epochs)
            epochs = new
            if command.timed_out or command.returncode != 0 or not progressed:
                break
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the final model.safetensors stays
        record = read_json(run_dir / "metrics.json") or {}
        last = epochs[-1] if epochs else {}
        return {
            "status": "ok" if len(epochs) == sizes.epochs else ("partial" if epochs else None),
            "recipe": sizes.recipe,
            "epochs_planned": sizes.epochs,
            "epochs_trained": len(epochs),
            "complete": len(epochs) == sizes.epochs,
            "estimates": estimates,
            "test_acc": last.get("test_acc"),
            "examples_per_s": last.get("examples_per_s"),
            "arithmetic": record.get("arithmetic"),
            "device": record.get("device"),
            "metrics": str((run_dir / "metrics.json").relative_to(context.out_dir)),
        }

    return run


def bench_phase(sizes: Sizes, backends, section: str):
    folder = "bench" if section == "speed" else f"bench-{section}"
    extra = sizes.speed_args if section == "speed" else sizes.memory_args

    def run(context: PhaseContext) -> dict:
        out = context.out_dir / folder
        argv = cli("bench", "--device", sizes.device, "--backends", ",".join(backends), "--section", section)
        argv += ["--out", str(out), "--quiet", *extra]
        context.command(argv, folder)
        runs = sorted(p.name for p in (out / "runs").glob("*.json")) if (out / "runs").is_dir() else []
        reports = sorted(p.name for p in out.glob("*.md"))
        return {"folder": folder, "reports": reports, "measurements": runs}

    return run


# (phase, box, reserve) in seconds for the default budget; another budget scales them all.
BOXES = {"environment": (90, 20), "conformance": (170, 60), "train": (110, 40), "speed": (150, 60), "memory": (120, 0)}


def phases(sizes: Sizes, backends, precision: str, budget_s: float = DEFAULT_BUDGET_S) -> list[Phase]:
    """The check's phases with their boxes: within the budget each gets its box when the ones
    before it finish early, and none starts with less than its reserve."""
    scale = budget_s / DEFAULT_BUDGET_S
    box = {name: (b * scale, r * scale) for name, (b, r) in BOXES.items()}
    memory = "densenet121" if sizes is GPU else "a tiny net"
    out = [
        Phase("environment", environment_phase(sizes, backends, precision), *box["environment"], "GPUs, versions"),
        Phase("conformance", conformance_phase(sizes, backends), *box["conformance"], "the checks, exact arithmetic"),
    ]
    out += [
        Phase(f"train-{name}", train_phase(sizes, name, precision), *box["train"], f"{sizes.recipe} recipe in {name}")
        for name in backends
    ]
    out += [
        Phase("bench-speed", bench_phase(sizes, backends, "speed"), *box["speed"], "anchor, fp32, tf32, bf16"),
        Phase("bench-memory", bench_phase(sizes, backends, "memory"), *box["memory"], f"{memory}, memory-efficient"),
    ]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/gpu-check", help="the results folder (default build/gpu-check)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds in all (default 480)")
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS), help="comma-separated (default torch,jax)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="the training phases' (default fp32)")
    parser.add_argument("--rehearse", action="store_true", help="tiny sizes on the CPU: checks the script itself")
    args = parser.parse_args(argv)
    backends = [name for name in args.backends.split(",") if name]
    try:
        for name in backends:
            check_backend_name(name, with_reference=False)
        if args.budget <= 0:
            raise ValueError(f"--budget must be a positive number of seconds, got {args.budget:g}")
    except ValueError as error:
        print(f"gpu-check: error: {error}", file=sys.stderr)
        return 2
    sizes = REHEARSAL if args.rehearse else GPU
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    header = {"rehearsal": args.rehearse, "device": sizes.device, "backends": backends, "precision": args.precision}
    record = run_phases(
        phases(sizes, backends, args.precision, args.budget),
        out,
        args.budget,
        python_env(),
        header,
        on_save=lambda record: summary.write(out, record),
    )
    print(summary.markdown(out, record))
    print(f"gpu-check: results in {out}; publish them with: python -m conformance.gpucheck.publish {out}")
    bad = [name for name, phase in record["phases"].items() if phase["status"] not in ("ok", "partial")]
    return 1 if bad else 0
