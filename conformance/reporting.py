"""What every report shares (`make conformance`, `make bench`, the training reports): the
machine and framework versions in the record, the date, Markdown tables, matplotlib plots,
and the md + json + png files written and published atomically.
"""

from __future__ import annotations

import datetime
import io
import os
import platform
from importlib import metadata
from pathlib import Path

from .files import atomic_write_bytes, atomic_write_text, write_json

DISTRIBUTIONS = ("numpy", "torch", "mxnet", "tensorflow", "tensorflow-cpu", "keras", "jax", "jaxlib", "flax", "optax")


def utc_date() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = ""
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        kib = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
        memory = f"{kib / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": memory,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def framework_versions() -> dict:
    versions = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def run_record() -> dict:
    """When and where a report's numbers were measured: its date, machine and versions."""
    return {"date": utc_date(), "machine": machine_info(), "frameworks": framework_versions()}


def versions_line(frameworks: dict) -> str:
    return ", ".join(f"{name} {version}" for name, version in frameworks.items())


def matrix_table(corner: str, rows, columns, cell) -> list[str]:
    """A Markdown table: `rows` down, `columns` across, `cell(row, column)` in each place."""
    out = [f"| {corner} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    return out + [f"| {row} | " + " | ".join(cell(row, column) for column in columns) + " |" for row in rows]


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(figure, path) -> None:
    """The figure as a PNG, written atomically, and closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    pyplot().close(figure)


def write_files(out_dir, result: dict, json_name: str, md_name: str, markdown, plots: dict) -> None:
    """A report's files, each atomically: `result` as JSON, `markdown(result)`, and every
    `plots[png name](result, path)`."""
    out_dir = Path(out_dir)
    write_json(out_dir / json_name, result)
    atomic_write_text(out_dir / md_name, markdown(result))
    for name, plot in plots.items():
        plot(result, out_dir / name)


def publish_files(out_dir, dest, names) -> None:
    """Copy a report's files that exist to `dest` (docs/results), each atomically."""
    for name in names:
        source = Path(out_dir) / name
        if source.is_file():
            atomic_write_bytes(Path(dest) / name, source.read_bytes())
