"""Copy a GPU check's results into the docs (default docs/results/gpu/), replacing what was there:

    python -m conformance.gpucheck.publish build/gpu-check [docs/results/gpu]

Reports, records, plots and logs are copied; weights, ONNX graphs and data are not.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from .timebox import RECORD

KEPT_SUFFIXES = {".md", ".json", ".png", ".log", ".txt"}
SKIPPED_FOLDERS = {"checkpoints", "exports", "zoo", "onnx", "data"}
DEFAULT_DESTINATION = "docs/results/gpu"


def files_to_publish(source: Path) -> list[Path]:
    return sorted(
        path.relative_to(source)
        for path in source.rglob("*")
        if path.is_file()
        and path.suffix in KEPT_SUFFIXES
        and not SKIPPED_FOLDERS & set(path.relative_to(source).parts[:-1])
        and not path.name.startswith(".")
    )


def publish(source, destination=DEFAULT_DESTINATION) -> list[Path]:
    """The files copied. The destination is replaced as a whole, through a folder beside it."""
    source, destination = Path(source), Path(destination)
    if not (source / RECORD).is_file():
        raise ValueError(f"{source} holds no GPU check ({RECORD} is missing); run `make gpu-check` first")
    files = files_to_publish(source)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
    try:
        for relative in files:
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / relative, staging / relative)
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.gpucheck.publish", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a GPU check's results folder (build/gpu-check)")
    parser.add_argument("destination", nargs="?", default=DEFAULT_DESTINATION, help="default docs/results/gpu")
    args = parser.parse_args(argv)
    try:
        files = publish(args.source, args.destination)
    except (ValueError, OSError) as error:
        print(f"gpu-check publish: error: {error}", file=sys.stderr)
        return 2
    print(f"published {len(files)} files from {args.source} to {args.destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
