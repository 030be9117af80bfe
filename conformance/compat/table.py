"""docs/compat.md, rendered from the version sets' results (docs/results/compat/<set>.json)."""

from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_write_text
from .sets import CHECKS, TESTS

COLUMNS = ("torch", "jax", "flax", "optax", "tensorflow", "keras", "mxnet", "numpy")
BACKENDS = ("torch", "mxnet", "tf", "jax")

INTRO = """# Tested versions

`make compat VERSIONS=<set>` builds a venv of its own for a version set (`.compat/<set>/`; `pins`
is the project's `.venv`), runs the fast contract tests in it (`{tests}`) and
`densenet-xf check` against the NumPy reference on a small matrix ({checks}, float32 and float64)
for every backend whose framework the set installs, and writes what passed to
`docs/results/compat/<set>.json`; this page is rendered from those files
(`python -m conformance.compat table`). The ranges declared in `pyproject.toml` are the ones
tested here. A framework the set does not install is "not installed": its tests skip.
"""


def load(results_dir) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(Path(results_dir).glob("*.json"))]


def _tests(result: dict, key: str = "all") -> str:
    counts = result["tests"].get("counts", {}).get(key)
    if not counts:
        return f"did not run (exit code {result['tests'].get('returncode')})" if key == "all" else ""
    return f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"


def _checks(result: dict, backend: str) -> str:
    checks = result["checks"].get(backend)
    if not checks:
        return "not installed"
    bad = [config for config, verdict in checks.items() if verdict != "passed"]
    return f"{len(checks) - len(bad)}/{len(checks)} passed" + (f" (failed: {', '.join(bad)})" if bad else "")


def markdown(results: list[dict]) -> str:
    checks = ", ".join(f"`{arch}` at {size}x{size}" for arch, size in CHECKS)
    lines = [INTRO.format(tests=" ".join(TESTS), checks=checks).rstrip(), ""]
    lines += [
        "| set | verdict | Python | " + " | ".join(COLUMNS) + " | contract tests | date |",
        "|---|---|---|" + "---|" * len(COLUMNS) + "---|---|",
    ]
    for r in results:
        versions = [r["versions"].get(name, "-") for name in COLUMNS]
        verdict = "passed" if r["passed"] else "**failed**"
        lines.append(
            f"| `{r['set']}` | {verdict} | {r['python']} | " + " | ".join(versions) + f" | {_tests(r)} | {r['date']} |"
        )
    lines += ["", "Each backend, per set: contract tests, and `densenet-xf check` on the matrix.", ""]
    lines += ["| set | " + " | ".join(BACKENDS) + " |", "|---|" + "---|" * len(BACKENDS)]
    for r in results:
        cells = [
            f"{_tests(r, b) or 'no tests ran'}; check {_checks(r, b)}" if r["checks"].get(b) else "not installed"
            for b in BACKENDS
        ]
        lines.append(f"| `{r['set']}` | " + " | ".join(cells) + " |")
    lines += ["", "## The sets", ""]
    for r in results:
        lines.append(f"- `{r['set']}`: {r['about']}. Measured {r['date']} on {r['machine']}.")
        lines += [f"  - failed: `{name}`" for name in r["tests"].get("failed", [])]
    return "\n".join(lines) + "\n"


def write(results_dir, out) -> None:
    atomic_write_text(out, markdown(load(results_dir)))
