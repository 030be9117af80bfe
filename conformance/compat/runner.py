"""Build a version set's venv, run the fast contract tests and the check matrix in it, record
what passed, and render the table of every set tested.

    python -m conformance.compat run gpu [--rebuild]   # .compat/gpu/, then docs/results/compat/gpu.json
    python -m conformance.compat table                 # docs/compat.md from docs/results/compat/*.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict
from pathlib import Path

from ..files import atomic_write_text
from . import table
from .sets import CHECKS, SETS, TESTS, VersionSet

CHECKOUT = Path(__file__).resolve().parents[2]
RESULTS = CHECKOUT / "docs" / "results" / "compat"
WORK = CHECKOUT / "build" / "compat"
BACKENDS = ("torch", "mxnet", "tf", "jax")
BUILD_TIMEOUT_S, TESTS_TIMEOUT_S, CHECK_TIMEOUT_S = 3600, 1800, 600
STAMP = ".compat-set.json"


class CompatError(RuntimeError):
    """A version set that cannot be built or run as asked."""


def find_python(version: str) -> str:
    """An interpreter of `version` (major.minor): this one, `pythonX.Y` on the PATH, or pyenv's."""
    if f"{sys.version_info.major}.{sys.version_info.minor}" == version and sys.prefix == sys.base_prefix:
        return sys.executable
    candidates = [shutil.which(f"python{version}")]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += sorted(glob.glob(str(pyenv / f"{version}.*" / "bin" / f"python{version}")), reverse=True)
    for candidate in filter(None, candidates):
        done = subprocess.run([candidate, "-c", "import venv"], capture_output=True)
        if done.returncode == 0:
            return candidate
    raise CompatError(f"no Python {version} found (looked for python{version} on the PATH and in {pyenv})")


def venv_dir(version_set: VersionSet) -> Path:
    return CHECKOUT / (version_set.venv or f".compat/{version_set.name}")


def _run(argv, log: Path, timeout: float, env: dict | None = None) -> int:
    """`argv` with its output appended to `log`; -1 when it ran out of time."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as stream:
        stream.write(f"$ {' '.join(map(str, argv))}\n")
        stream.flush()
        try:
            return subprocess.run(
                [str(a) for a in argv], stdout=stream, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=CHECKOUT
            ).returncode
        except subprocess.TimeoutExpired:
            stream.write(f"[stopped after {timeout} s]\n")
            return -1


def build(version_set: VersionSet, log: Path, rebuild: bool = False) -> Path:
    """The set's venv, built unless one of the same definition is there; its python."""
    directory = venv_dir(version_set)
    python = directory / "bin" / "python"
    if version_set.venv:  # built by another command
        if not python.is_file():
            raise CompatError(f"{directory} does not exist: build it first (make setup)")
        return python
    definition = json.dumps(asdict(version_set), sort_keys=True)
    stamp = directory / STAMP
    if not rebuild and stamp.is_file() and stamp.read_text() == definition and python.is_file():
        return python
    shutil.rmtree(directory, ignore_errors=True)
    interpreter = find_python(version_set.python)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_PROGRESS_BAR": "off"}
    if version_set.lift_cap:  # the machine-wide constraints file caps torch; it is read from pip's config
        env["PIP_CONFIG_FILE"] = os.devnull
    steps = [[interpreter, "-m", "venv", directory], [python, "-m", "pip", "install", "-q", "--upgrade", "pip"]]
    steps.append([python, "-m", "pip", "install", *version_set.packages])
    if version_set.no_deps:
        steps.append([python, "-m", "pip", "install", "--no-deps", *version_set.no_deps])
    print(f"compat {version_set.name}: building {directory} with Python {version_set.python} (log: {log})", flush=True)
    for step in steps:
        code = _run(step, log, BUILD_TIMEOUT_S, env)
        if code != 0:
            raise CompatError(
                f"building {directory} failed (exit code {code}) at `{' '.join(map(str, step))}`; see {log}"
            )
    atomic_write_text(stamp, definition)
    return python


def test_env() -> dict:
    """The project from this checkout, one OpenMP thread per core at most, nothing from a registry."""
    path = os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PIP_NO_INDEX": "1"}


def junit_counts(path: Path) -> dict:
    """{"all"|backend: {"passed", "failed", "skipped"}} and the failed tests' names, from pytest's JUnit XML."""
    counts: dict = {}
    failed = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        params = name.partition("[")[2].rstrip("]").split("-")
        backend = params[0] if params[0] in BACKENDS else "core"
        outcome = (
            "failed"
            if case.find("failure") is not None or case.find("error") is not None
            else "skipped"
            if case.find("skipped") is not None
            else "passed"
        )
        for key in ("all", backend):
            counts.setdefault(key, {"passed": 0, "failed": 0, "skipped": 0})[outcome] += 1
        if outcome == "failed":
            failed.append(f"{case.get('classname', '')}::{name}")
    return {"counts": counts, "failed": failed}


def run_tests(python: Path, work: Path) -> dict:
    junit = work / "junit.xml"
    junit.unlink(missing_ok=True)
    start = time.monotonic()
    argv = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *TESTS]
    code = _run(argv, work / "tests.log", TESTS_TIMEOUT_S, test_env())
    result = {"files": list(TESTS), "returncode": code, "seconds": round(time.monotonic() - start, 1)}
    if junit.is_file():
        result.update(junit_counts(junit))
    return result


def run_checks(python: Path, backends: list[str], work: Path) -> dict:
    results = {}
    for backend in backends:
        for arch, size in CHECKS:
            argv = [python, "-m", "conformance", "check", "--backend", backend, "--arch", arch, "--size", size]
            log = work / "checks.log"
            code = _run(argv, log, CHECK_TIMEOUT_S, test_env())
            results.setdefault(backend, {})[f"{arch}@{size}"] = "passed" if code == 0 else f"failed (exit code {code})"
            print(f"compat: check {backend} {arch}@{size}: {results[backend][f'{arch}@{size}']}", flush=True)
    return results


def installed(python: Path, work: Path) -> dict:
    """conformance.environment's report, as the venv's Python sees it."""
    out = work / "environment.json"
    with open(out, "w") as stream:
        subprocess.run(
            [python, "-m", "conformance.environment", "--json"],
            stdout=stream,
            env=test_env(),
            cwd=CHECKOUT,
            timeout=120,
        )
    return json.loads(out.read_text())


def run(name: str, rebuild: bool = False) -> int:
    if name not in SETS:
        raise CompatError(f"unknown version set {name!r}; valid: {', '.join(SETS)}")
    version_set = SETS[name]
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    for log in ("tests.log", "checks.log"):
        (work / log).unlink(missing_ok=True)
    python = build(version_set, work / "build.log", rebuild)
    env = installed(python, work)
    available = [b for b in BACKENDS if not any(r["missing"] for r in env["frameworks"][b])]
    print(f"compat {name}: Python {env['python']}, backends installed: {', '.join(available) or 'none'}", flush=True)
    tests = run_tests(python, work)
    print(f"compat {name}: tests {tests.get('counts', {}).get('all')} (exit code {tests['returncode']})", flush=True)
    checks = run_checks(python, available, work)
    versions = {
        r["distribution"]: r["version"]
        for group in [env["core"], env["optional"], *env["frameworks"].values()]
        for r in group
        if r["version"]
    }
    passed = tests["returncode"] == 0 and all(v == "passed" for c in checks.values() for v in c.values())
    result = {
        "set": name,
        "about": version_set.about,
        "python": env["python"],
        "versions": versions,
        "backends": {b: ("installed" if b in available else "not installed") for b in BACKENDS},
        "tests": tests,
        "checks": checks,
        "passed": passed,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
    }
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(result, indent=2) + "\n")
    table.write(RESULTS, CHECKOUT / "docs" / "compat.md")
    print(f"compat {name}: {'passed' if passed else 'FAILED'}; {RESULTS / (name + '.json')}, docs/compat.md")
    return 0 if passed else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.compat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="build (if needed) and test one version set")
    p.add_argument("name", help=", ".join(SETS))
    p.add_argument("--rebuild", action="store_true", help="build the venv again even if it is there")
    sub.add_parser("table", help="render docs/compat.md from docs/results/compat/*.json")
    args = parser.parse_args(argv)
    try:
        if args.command == "table":
            table.write(RESULTS, CHECKOUT / "docs" / "compat.md")
            return 0
        return run(args.name, args.rebuild)
    except CompatError as error:
        print(f"compat: error: {error}", file=sys.stderr)
        return 2
