"""The "export" part of `make conformance`: every backend's ONNX graph in onnxruntime.

Each must reproduce its backend's own logits, and the four graphs of one canonical checkpoint
must give the same logits (a 4x4 matrix: row = the backend whose logits are the reference,
column = the backend whose ONNX graph ran). onnxruntime is imported only when a graph runs.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import numpy as np

from .. import reference, specs, weights
from ..export import backend_exporter
from ..reporting import matrix_table
from . import checks

EXPORT_ARCH, EXPORT_SIZE, EXPORT_BATCH, EXPORT_SEED = "tiny", 32, 4, 17


def export_batch() -> np.ndarray:
    """The fixed NCHW batch every ONNX graph runs on."""
    return checks.make_batch(specs.get_spec(EXPORT_ARCH), EXPORT_SIZE, EXPORT_BATCH, seed=EXPORT_SEED)[0]


def onnx_tolerance() -> tuple[float, str]:
    """A graph in onnxruntime and a backend, two float32 implementations on the same weights,
    each within the float32 eval tolerance of the reference: within twice it of each other
    (checks.float32_forward_tolerance on the export's net, weights and batch)."""
    spec = specs.get_spec(EXPORT_ARCH)
    state, x = weights.init_state(spec, seed=EXPORT_SEED, randomize_bn=True), export_batch()
    tolerance, words = checks.float32_forward_tolerance(spec, state, x, reference.forward(spec, state, x), EXPORT_SEED)
    return 2 * tolerance, f"2 x {words}"


def run_onnx(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def measure(backend, out_dir) -> dict:
    """A worker's part: the canonical checkpoint's eval logits in `backend`, its ONNX export, and
    onnxruntime's logits on that export. An exporter that fails is recorded with its error."""
    spec = specs.get_spec(EXPORT_ARCH)
    model = backend.build(spec)
    backend.load_state(model, weights.init_state(spec, seed=EXPORT_SEED, randomize_bn=True))
    x = specs.to_layout(export_batch(), backend.layout)
    result = {
        "exporter": f"{backend.name}'s exporter",
        "layout": backend.layout,
        "logits": backend.forward(model, x, train=False).tolist(),
    }
    path = Path(out_dir) / "onnx" / f"{backend.name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:  # an exporter that is missing or cannot handle this framework: the report says why
        exporter = backend_exporter(backend)
        result["exporter"] = exporter.EXPORTER
        exporter.export_onnx(model, path, EXPORT_SIZE)
    except ModuleNotFoundError as error:  # the exporter's package is not installed: skipped, as a missing framework
        return {**result, "skipped": f"{error} (the exporter's package is not installed)"}
    except Exception as error:
        return {**result, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    return {**result, "path": str(path), "seconds": time.perf_counter() - start}


def section(results: dict) -> dict | None:
    """The report's "export" part from every backend's measure(): the 4x4 matrix and failures."""
    measured = {name: data["onnx"] for name, data in results.items() if "onnx" in data}
    if not measured:
        return None
    failures = [
        f"{name}: ONNX export failed ({m['exporter']}): {m['error']}" for name, m in measured.items() if "error" in m
    ]
    errors = {name: {} for name in measured}
    tolerance, derivation = onnx_tolerance()
    x = export_batch()
    for graph, m in measured.items():
        if "path" not in m:
            continue
        try:
            logits = run_onnx(m["path"], specs.to_layout(x, m["layout"]))
        except Exception as error:  # onnxruntime missing, or a graph it cannot run
            failures.append(f"{graph}: onnxruntime could not run {m['path']}: {type(error).__name__}: {error}")
            continue
        for source, r in measured.items():
            errors[source][graph] = error = checks.relative_error(logits, np.asarray(r["logits"]))
            if error > tolerance:
                failures.append(f"{graph}'s ONNX graph vs {source}'s logits: error {error:.3g} > {tolerance:.3g}")
    return {
        "arch": EXPORT_ARCH,
        "size": EXPORT_SIZE,
        "batch": EXPORT_BATCH,
        "tolerance": tolerance,
        "derivation": derivation,
        "exporters": {name: m["exporter"] for name, m in measured.items()},
        "export_errors": {name: m["error"] for name, m in measured.items() if "error" in m},
        "export_skipped": {name: m["skipped"] for name, m in measured.items() if "skipped" in m},
        "seconds": {name: m.get("seconds") for name, m in measured.items()},
        "errors": errors,
        "failures": failures,
    }


def markdown(result: dict | None) -> list[str]:
    if not result:
        return []
    names = list(result["errors"])
    out = [
        "",
        "## Export: every backend's ONNX graph in onnxruntime",
        "",
        f"One canonical checkpoint (`{result['arch']}` at {result['size']}x{result['size']}, batch {result['batch']}) "
        f"in each backend, exported to ONNX by that framework's own exporter and run in onnxruntime on the "
        f"same batch. Relative error of each graph's logits against each backend's own logits "
        f"(tolerance {result['tolerance']:.1e} = {result.get('derivation', '')}); the diagonal is each backend "
        f"reproduced by its own export. "
        f"`docs/deploy.md` says how to export.",
        "",
    ] + matrix_table(
        "backend's logits \\ ONNX graph from",
        names,
        names,
        lambda reference, graph: (
            f"{result['errors'][reference][graph]:.1e}" if graph in result["errors"][reference] else "not run"
        ),
    )
    out += ["", "| backend | exporter | export seconds | exporter error |", "|---|---|---|---|"]
    for name in names:
        seconds = result["seconds"].get(name)
        out.append(
            f"| {name} | {result['exporters'][name]} | {'' if seconds is None else f'{seconds:.1f}'} | "
            f"{result['export_errors'].get(name, '') or _skipped(result, name)} |"
        )
    return out


def _skipped(result: dict, name: str) -> str:
    reason = result.get("export_skipped", {}).get(name)
    return f"skipped: {reason}" if reason else ""
