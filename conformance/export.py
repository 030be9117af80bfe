"""`densenet-xf export`: a canonical checkpoint in a framework's own format or as ONNX.

Each backend's `export.py` writes its framework's own format (`save_native`) and ONNX through
its ecosystem's exporter (`export_onnx`); this module picks the backend's exporter and checks
the command's inputs. The ONNX graphs are checked in onnxruntime by conformance.suite.onnx.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import specs, weights
from .backends import backend_module

FORMATS = ("onnx", "native")


def backend_exporter(backend):
    """The `export` module next to the backend's `backend.py` (densenet_torch.export, ...)."""
    return backend_module(backend.name, "export")


def checkpoint_size(path) -> int | None:
    metadata = weights.read_metadata(path)
    return json.loads(metadata["recipe"])["size"] if "recipe" in metadata else None


def export_checkpoint(backend, checkpoint, fmt: str, out, size: int | None = None) -> dict:
    """Write a canonical checkpoint in `fmt` (onnx or native) from `backend`; what was written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    size = size or checkpoint_size(checkpoint)
    if size is None:
        raise ValueError(f"{checkpoint} records no input size; pass --size")
    spec = weights.spec_of_checkpoint(checkpoint)
    specs.check_input_size(spec, size)
    model = backend.build(spec)
    backend.load_state(model, weights.load_state(checkpoint, spec))
    exporter = backend_exporter(backend)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    (exporter.export_onnx if fmt == "onnx" else exporter.save_native)(model, out, size)
    return {
        "backend": backend.name,
        "format": fmt,
        "arch": spec.name,
        "size": size,
        "out": str(out),
        "exporter": exporter.EXPORTER if fmt == "onnx" else f"native ({backend.name})",
    }
