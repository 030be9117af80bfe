"""The GPU check's `summary.md`, rewritten from whatever the results folder holds after every
change, so that a run stopped at any point still has one page saying what was done."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

from ..files import atomic_write_text

SUMMARY = "summary.md"


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _seconds(value) -> str:
    return "" if value is None else f"{value:.0f}"


def environment_lines(out_dir: Path) -> list[str]:
    env = _json(out_dir / "environment.json")
    if not env:
        return []
    host = env.get("host", {})
    lines = ["", "## Environment", ""]
    for gpu in host.get("gpus", []):
        lines.append(
            f"- GPU {gpu.get('index', '')}: {gpu.get('name', '')}, driver {gpu.get('driver_version', '')}, "
            f"{gpu.get('memory.total', '')}, compute capability {gpu.get('compute_cap', '')}"
        )
    if not host.get("gpus"):
        lines.append(f"- no GPU listed ({host.get('gpus_note', 'nvidia-smi printed none')})")
    lines.append(f"- Python {host.get('python', '')}, {host.get('cpus', '')} CPUs ({host.get('cpu', '')})")
    if host.get("commit"):
        lines.append(f"- commit {host['commit']}")
    lines += ["", "| backend | versions | computes on | steps (s/step, first step) |", "|---|---|---|---|"]
    for name, probe in env.items():
        if name in ("host", "packages") or not isinstance(probe, dict):
            continue
        versions = ", ".join(f"{k} {v}" for k, v in (probe.get("versions") or {}).items() if v)
        where = probe.get("device") or f"{probe.get('status')}: {probe.get('reason', '')}"
        if probe.get("device_note"):
            where += f" ({probe['device_note']})"
        timing = probe.get("step_time") or {}
        steps = (
            f"{timing['step_s']:.4f} s at {timing['size']}x{timing['size']}, batch {timing['batch']}, "
            f"{timing['arithmetic']}; first {timing['first_step_s']:.1f} s"
            if timing
            else ""
        )
        lines.append(f"| {name} | {versions} | {where} | {steps} |")
    return lines


def training_lines(record: dict) -> list[str]:
    rows = [(name, phase) for name, phase in record["phases"].items() if name.startswith("train-")]
    rows = [(name, phase) for name, phase in rows if "epochs_trained" in phase]
    if not rows:
        return []
    lines = [
        "",
        "## Training",
        "",
        "| backend | recipe | epochs | final test accuracy | examples/s (last epoch) | arithmetic | device |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, phase in rows:
        epochs = f"{phase['epochs_trained']} of {phase['epochs_planned']}"
        if not phase.get("complete"):
            epochs += " (as many as fit)"
        acc = "" if phase.get("test_acc") is None else f"{phase['test_acc']:.4f}"
        speed = "" if phase.get("examples_per_s") is None else f"{phase['examples_per_s']:.0f}"
        lines.append(
            f"| {name[len('train-') :]} | {phase.get('recipe')} | {epochs} | {acc} | {speed} | "
            f"{phase.get('arithmetic') or ''} | {phase.get('device') or ''} |"
        )
    return lines


def markdown(out_dir, record: dict) -> str:
    out_dir = Path(out_dir)
    title = "GPU check rehearsal (CPU, tiny sizes)" if record.get("rehearsal") else "GPU check"
    lines = [
        f"# {title}",
        "",
        f"Started {record.get('started', '')}; budget {record.get('budget_s', 0):.0f} s, "
        f"{record.get('elapsed_s', 0):.0f} s used"
        + ("" if record.get("finished") else " so far (not finished: the run is going on or was stopped)")
        + f". Backends {', '.join(record.get('backends', []))}, training arithmetic {record.get('precision', '')}.",
        "",
        "| phase | what | status | seconds | allowed | notes |",
        "|---|---|---|---|---|---|",
    ]
    for name, phase in record["phases"].items():
        notes = phase.get("reason", "")
        if "passed" in phase:
            notes = "all checks passed" if phase["passed"] else f"{len(phase.get('failures', []))} failure(s)"
        if phase.get("report"):
            notes += f"; [{phase['report']}]({phase['report']})"
        for report in phase.get("reports", []):
            notes += f"; [{phase['folder']}/{report}]({phase['folder']}/{report})"
        if phase.get("status") in ("failed", "timed out", "error", "running"):
            logs = [c["log"] for c in phase.get("commands", [])]
            notes += "; " + ", ".join(f"[{log}]({log})" for log in logs) if logs else ""
        lines.append(
            f"| {name} | {phase.get('what', '')} | {phase['status']} | {_seconds(phase.get('seconds'))} | "
            f"{_seconds(phase.get('allowed_s'))} | {notes.strip('; ')} |"
        )
    conformance = record["phases"].get("conformance", {})
    if conformance.get("failures"):
        lines += ["", "Conformance failures:", ""] + [f"- {failure}" for failure in conformance["failures"]]
    lines += environment_lines(out_dir) + training_lines(record)
    return "\n".join(lines) + "\n"


def write(out_dir, record: dict) -> None:
    """summary.md in `out_dir`; a summary that cannot be made says why instead of stopping the run."""
    try:
        text = markdown(out_dir, record)
    except Exception:  # the run goes on: the record (phases.json) has everything
        text = f"# GPU check\n\nThe summary could not be made:\n\n```\n{traceback.format_exc()}```\n"
    atomic_write_text(Path(out_dir) / SUMMARY, text)
