"""What every report shares (`make conformance`, `make bench`, the training reports): the
machine and framework versions in the record, the date, Markdown tables, matplotlib plots,
and the md + json + png files written and published atomically.
"""

from __future__ import annotations

import datetime
import io
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from .files import atomic_write_bytes, atomic_write_text, write_json

DISTRIBUTIONS = (
    "numpy",
    "torch",
    "mxnet",
    "tensorflow",
    "tensorflow-cpu",
    "keras",
    "jax",
    "jaxlib",
    "jax-cuda12-plugin",
    "jax-cuda13-plugin",
    "flax",
    "optax",
)
# The processor features CPU speed depends on: bf16 ran 6-8 times slower than fp32 without
# avx512_bf16 or AMX, and faster than fp32 with them.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


def utc_date() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def cpu_info() -> dict:
    """The CPU's model, family and the flags in CPU_FLAGS it has (Linux's /proc/cpuinfo)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {"cpu": platform.processor(), "family": "", "flags": []}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "cpu": fields.get("model name", platform.processor()),
        "family": f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}",
        "flags": [flag for flag in CPU_FLAGS if flag in flags],
    }


def gpu_info() -> list[str]:
    """Each NVIDIA GPU with its driver and memory (nvidia-smi), [] without one."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def machine_info() -> dict:
    cpu = cpu_info()
    memory = ""
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        kib = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
        memory = f"{kib / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {
        **cpu,
        "gpus": gpu_info(),
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


def machine_line(machine: dict) -> str:
    """The machine in one line: CPU, the flags that matter, cores, memory, GPUs."""
    flags = ", ".join(machine.get("flags", [])) or "none of " + "/".join(CPU_FLAGS)
    gpus = "; ".join(machine.get("gpus", [])) or "no GPU"
    return (
        f"{machine['cpu']} ({machine.get('family', '')}; flags: {flags}), {machine['cores']} cores, "
        f"{machine['memory']}; {gpus}"
    )


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
