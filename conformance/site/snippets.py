"""The site's runnable snippets: docs/snippets/<topic>_<backend>.py, each run in its own process.

A snippet is a plain script (run it with `PYTHONPATH=. python docs/snippets/shapes_torch.py`)
that asserts what it prints. The site shows its code and the output of a run at build time;
the tests run every snippet. A run's output is cached under build/docs/snippets, keyed by
the snippet's text and every source file it can import, so an unchanged snippet over
unchanged code is not run twice, and any change to the code runs it again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..backends import FRAMEWORKS
from ..files import atomic_write_text, cache_dir
from .source import BACKENDS, ROOT

SNIPPETS = ROOT / "docs" / "snippets"
CACHE = ROOT / "build" / "docs" / "snippets"
# The module whose absence means the backend's framework is not installed.
FRAMEWORK = {name: framework.module for name, framework in FRAMEWORKS.items()}
TIMEOUT_S = 600


class SnippetError(RuntimeError):
    """A snippet failed: the code it shows no longer runs."""


@dataclass(frozen=True)
class Snippet:
    topic: str
    backend: str

    @property
    def path(self) -> Path:
        return SNIPPETS / f"{self.topic}_{self.backend}.py"

    @property
    def code(self) -> str:
        return self.path.read_text()

    @property
    def installed(self) -> bool:
        return importlib.util.find_spec(FRAMEWORK[self.backend]) is not None


def snippets(topic: str | None = None) -> list[Snippet]:
    """Every snippet (of one topic), in the tabs' order: torch, mxnet, tf, jax."""
    found = []
    for path in sorted(SNIPPETS.glob("*_*.py")):
        name, backend = path.stem.rsplit("_", 1)
        if backend not in BACKENDS:
            raise ValueError(f"{path}: a snippet's name ends in one of {', '.join(BACKENDS)}, got {backend!r}")
        if topic in (None, name):
            found.append(Snippet(name, backend))
    order = list(BACKENDS)
    return sorted(found, key=lambda s: (s.topic, order.index(s.backend)))


def fingerprint(snippet: Snippet) -> str:
    digest = hashlib.sha256(snippet.code.encode())
    for package in ("conformance", BACKENDS[snippet.backend]):
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # XLA compiles every eager JAX op; its persistent cache makes the next run take seconds.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir() / "jax"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return env


def execute(snippet: Snippet) -> str:
    """Run the snippet in a fresh interpreter; its stdout, or SnippetError with its stderr."""
    done = subprocess.run(
        [sys.executable, str(snippet.path)],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if done.returncode != 0:
        raise SnippetError(f"{snippet.path.relative_to(ROOT)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def run(snippet: Snippet, use_cache: bool = True) -> str:
    """The snippet's output: from the cache when neither it nor the code changed, else a fresh run."""
    cached = CACHE / f"{snippet.topic}_{snippet.backend}-{fingerprint(snippet)}.txt"
    if use_cache and cached.is_file():
        return cached.read_text()
    output = execute(snippet)
    for stale in CACHE.glob(f"{snippet.topic}_{snippet.backend}-*.txt"):
        stale.unlink(missing_ok=True)
    atomic_write_text(cached, output)
    return output


def run_all(found: list[Snippet]) -> None:
    """Run (or find in the cache) every installed snippet, as many at once as there are cores."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(run, [s for s in found if s.installed]))
