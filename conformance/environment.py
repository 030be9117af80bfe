"""What this Python offers the project: the packages every command needs, each backend's
framework, and the test and export tools, with their versions, or why they are missing.

    python -m conformance.environment            # the table; exit 2 if a core package is missing
    python -m conformance.environment --json     # the same as JSON
    python -m conformance.environment --import   # also import each backend, each in a process of its own

It is what `make ... PYTHON_ENV=system` checks before it runs anything: the project then runs
from the checkout with the Python that is already there (no venv, nothing downloaded), and a
backend whose framework is absent is reported as skipped by the commands themselves. Versions
are read from the installed distributions' metadata, so no framework is imported unless asked.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Requirement:
    module: str  # what is imported
    distribution: str  # whose metadata gives the version (and what pip installs)
    needed_by: str  # which part of the project needs it


CORE = (  # every command: missing one of these is an error
    Requirement("numpy", "numpy", "everything"),
    Requirement("safetensors", "safetensors", "checkpoints"),
    Requirement("matplotlib", "matplotlib", "reports' plots"),
    Requirement("tqdm", "tqdm", "progress bars"),
    Requirement("PIL", "pillow", "resizing Fashion-MNIST"),
)
FRAMEWORKS = {  # backend: what its package imports; a missing one makes the backend skip
    "torch": (Requirement("torch", "torch", "backend torch"),),
    "mxnet": (Requirement("mxnet", "mxnet", "backend mxnet"),),
    "tf": (Requirement("tensorflow", "tensorflow", "backend tf"), Requirement("keras", "keras", "backend tf")),
    "jax": (
        Requirement("jax", "jax", "backend jax"),
        Requirement("jaxlib", "jaxlib", "backend jax"),
        Requirement("flax", "flax", "backend jax"),
        Requirement("optax", "optax", "backend jax"),
    ),
}
# TensorFlow's CPU-only and GPU wheels install the same module under other names.
ALTERNATIVES = {"tensorflow": ("tensorflow", "tensorflow-cpu", "tf-nightly")}
OPTIONAL = (  # make test; the ONNX matrix of make conformance (an exporter that is missing is a skipped row)
    Requirement("pytest", "pytest", "make test"),
    Requirement("hypothesis", "hypothesis", "make test"),
    Requirement("onnx", "onnx", "ONNX export"),
    Requirement("onnxruntime", "onnxruntime", "ONNX export"),
    Requirement("onnxscript", "onnxscript", "ONNX export from torch"),
    Requirement("tf2onnx", "tf2onnx", "ONNX export from tf"),
    Requirement("jax2onnx", "jax2onnx", "ONNX export from jax"),
)


def version(requirement: Requirement) -> str | None:
    """The installed version of the requirement's distribution, or None when none is installed."""
    for name in ALTERNATIVES.get(requirement.distribution, (requirement.distribution,)):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def present(requirement: Requirement) -> dict:
    """{"module", "distribution", "needed_by", "version", "missing"}, without importing the module."""
    found = importlib.util.find_spec(requirement.module) is not None
    installed = version(requirement)
    missing = None if found else "not installed" if installed is None else "installed but not importable"
    return {**requirement.__dict__, "version": installed, "missing": missing}


def core_import_errors() -> list[str]:
    """The core packages that do not import, each with the reason (these are not frameworks)."""
    errors = []
    for requirement in CORE:
        try:
            importlib.import_module(requirement.module)
        except Exception as error:  # an ImportError, or a broken install that fails while importing
            errors.append(f"{requirement.module} ({requirement.distribution}, for {requirement.needed_by}): {error}")
    return errors


def import_backend(name: str, timeout: float = 300) -> dict:
    """Import backend `name` in a process of its own: {"status": "ok"|"skipped"|"error", "reason"}."""
    code = (
        "import sys\n"
        "from conformance.backends import BackendUnavailable, load_backend\n"
        f"try:\n    load_backend({name!r})\n"
        "except BackendUnavailable as error:\n    print(error); sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, cwd=CHECKOUT
        )
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"importing took more than {timeout:.0f} s"}
    last = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    if done.returncode == 0:
        return {"status": "ok", "reason": ""}
    return {"status": "skipped" if done.returncode == 3 else "error", "reason": last[0]}


def report(import_backends: bool = False) -> dict:
    result = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "checkout": str(CHECKOUT),
        "core": [present(r) for r in CORE],
        "core_import_errors": core_import_errors(),
        "frameworks": {name: [present(r) for r in requirements] for name, requirements in FRAMEWORKS.items()},
        "optional": [present(r) for r in OPTIONAL],
    }
    if import_backends:
        result["backends"] = {name: import_backend(name) for name in FRAMEWORKS}
    return result


def missing_core(result: dict) -> list[str]:
    """What a user must install before anything runs, in words."""
    missing = [
        f"{r['module']} ({r['distribution']}, for {r['needed_by']}): {r['missing']}"
        for r in result["core"]
        if r["missing"]
    ]
    return missing or result["core_import_errors"]


def text(result: dict) -> str:
    lines = [f"Python {result['python']} ({result['executable']}), project from {result['checkout']}"]

    def row(r):
        return f"  {r['module']:<12} {r['version'] or '-':<16} {r['missing'] or 'ok'}"

    lines.append("core (every command):")
    lines += [row(r) for r in result["core"]]
    for name, requirements in result["frameworks"].items():
        absent = [r["module"] for r in requirements if r["missing"]]
        verdict = f"skipped: {', '.join(absent)} missing" if absent else "available"
        if "backends" in result:
            imported = result["backends"][name]
            verdict = "imports" if imported["status"] == "ok" else f"{imported['status']}: {imported['reason']}"
        lines.append(f"backend {name}: {verdict}")
        lines += [row(r) for r in requirements]
    lines.append("optional (tests, ONNX export):")
    lines += [row(r) for r in result["optional"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.environment", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--import", dest="import_backends", action="store_true", help="import each backend in a process of its own"
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing unless a core package is missing")
    args = parser.parse_args(argv)
    result = report(args.import_backends)
    missing = missing_core(result)
    if args.json:
        print(json.dumps(result, indent=2))
    elif not args.quiet:
        print(text(result))
    if missing:
        print(
            "error: this Python lacks what every command needs:\n  "
            + "\n  ".join(missing)
            + f"\ninstall them into {sys.executable}'s environment (pip install numpy safetensors matplotlib "
            "tqdm pillow), or use the project's venv (make setup)",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
