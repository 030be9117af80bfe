"""Files every part of the project writes: atomically, in the cache, in the repository.

A write goes to a temporary file beside its target and is renamed over it, so a reader never
sees half a file and an interrupted write leaves the old file in place. `merge_json` is how
the processes of one run (a backend's conformance worker, its data-parallel check) add their
results to the same `DIR/B.json`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# The checkout this package runs from: docs/, bench/anchors/ and docs/snippets/ live there.
REPOSITORY = Path(__file__).resolve().parents[1]


class WriteError(OSError):
    """A file could not be written; the message names it."""

    def __str__(self):
        return self.strerror


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: a reader never
    sees half a file, and an interrupted write leaves the old file in place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise WriteError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600; honour the umask as open() does
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise WriteError(
                error.errno,
                f"could not write {path} ({error.strerror or error}); any earlier version of it is unchanged",
            ) from error
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def bytes_written_by(write, suffix: str) -> bytes:
    """The bytes that `write(filename)` (a framework's writer that takes only a file name) writes,
    written in a temporary directory, so that they can land atomically where they belong."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "file" + suffix)
        write(path)
        with open(path, "rb") as stream:
            return stream.read()


def write_json(path: str | os.PathLike, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=float))


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in `path`, or {} where there is no file yet."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def merge_json(path: str | os.PathLike, update: dict) -> dict:
    """Read `path` (or start from {}), add `update`'s keys, write it back atomically; the result."""
    current = read_json(path)
    current.update(update)
    write_json(path, current)
    return current


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "densenet-xf"


def repository_path(*parts: str, what: str) -> Path:
    """A path inside the checkout (`what` names it for the error): the bench anchors and the
    site's sources are not part of an installed package."""
    path = REPOSITORY.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"{what} is not here ({path}): it lives in the densenet-xf repository, not in the installed "
            f"package; run this from a clone of the repository (pip install -e .)"
        )
    return path
