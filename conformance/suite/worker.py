"""One backend's part of `make conformance`, run in a Python process of its own.

    python -m conformance.suite.worker --backend B --phase checks|cross --out DIR [--device D] ...

Phase `checks` measures shapes, parameter counts and the reference comparison over the
matrix and, on the memory-efficient model, over its own list; exports a trained-one-step
canonical checkpoint for the cross-backend matrix, and trains the accuracy recipe; phase
`cross` loads every other backend's export and writes this backend's ONNX graph of a
canonical checkpoint (conformance.suite.onnx). Each phase merges its results into DIR/B.json.
A backend whose framework is missing writes status "skipped" with the reason.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from .. import specs, training, trajectory, weights, zoo
from ..backends import load_backend
from ..files import merge_json
from ..interface import BackendUnavailable
from . import checks, onnx

MEMORY_EFFICIENT_LABEL = "memory-efficient"


def run_matrix(backend, matrix, conditioning=None) -> list[dict]:
    rows = []
    for config in (checks.Config(*entry) for entry in matrix):
        arch, size, batch = config.arch, config.size, config.batch
        spec = checks.checked_spec(arch)
        label = f"{arch}@{size}"
        start = time.perf_counter()
        model = backend.build(spec)
        x = specs.to_layout(np.zeros((batch, spec.in_channels, size, size), np.float32), backend.layout)
        shapes = {k: list(v) for k, v in backend.stage_shapes(model, x).items()}
        expected = {k: list(v) for k, v in specs.stage_shapes(spec, size, batch, backend.layout).items()}
        rows.append(
            {
                "config": label,
                "check": "stage shapes",
                "passed": shapes == expected,
                "value": shapes,
                "expected": expected,
            }
        )
        counts = list(backend.count_params(model))
        rows.append(
            {
                "config": label,
                "check": "parameter counts",
                "passed": counts == list(specs.count_params(spec)),
                "value": counts,
                "expected": list(specs.count_params(spec)),
            }
        )
        results = checks.compare_with_reference(
            backend,
            spec,
            size,
            batch,
            trainer_step=config.trainer_step,
            float32_training=config.float32_training,
            float32_model=model,
            conditioning=(conditioning or {}).get(label),
        )
        for dtype, items in results.items():
            for name, item in items.items():
                rows.append({"config": label, "dtype": dtype, "check": name, **item})
        rows.append({"config": label, "check": "seconds", "passed": True, "value": time.perf_counter() - start})
    return rows


def run_memory_efficient(backend, matrix, conditioning=None) -> list[dict]:
    """The reference comparison again, on the memory-efficient model (config "ARCH@SIZE memory-efficient")."""
    rows = []
    for config in (checks.Config(*entry) for entry in matrix):
        label = f"{config.arch}@{config.size} {MEMORY_EFFICIENT_LABEL}"
        results = checks.compare_with_reference(
            backend,
            config.arch,
            config.size,
            config.batch,
            memory_efficient=True,
            trainer_step=config.trainer_step,
            float32_training=config.float32_training,
            conditioning=(conditioning or {}).get(f"{config.arch}@{config.size}"),
        )
        rows += [
            {"config": label, "dtype": dtype, "check": name, **item}
            for dtype, items in results.items()
            for name, item in items.items()
        ]
    return rows


def run_precisions(backend) -> list[dict]:
    """One trainer step per arithmetic mode (fp32, tf32, bf16) against the reference: config
    "ARCH@SIZE trainer", the mode in the dtype column."""
    arch, size, _ = checks.PRECISION_CONFIG
    return [
        {"config": f"{arch}@{size} trainer", "dtype": mode, "check": name, **item}
        for mode, items in checks.check_precisions(backend).items()
        for name, item in items.items()
    ]


def export_for_cross(backend, out_dir: Path) -> dict:
    """One SGD step from shared weights (so the export carries this backend's arithmetic),
    exported canonically, with this backend's own eval logits on the fixed batch."""
    spec, state, x, y = checks.cross_batch()
    model = backend.build(spec)
    backend.load_state(model, state)
    backend.make_trainer(model, checks.LR).train_step(specs.to_layout(x, backend.layout), y)
    path = out_dir / "exports" / f"{backend.name}.safetensors"
    weights.save_state(path, backend.export_state(model), spec, {"backend": backend.name})
    logits = backend.forward(model, specs.to_layout(x, backend.layout), train=False)
    return {"path": str(path), "logits": logits.tolist()}


def cross_load(backend, exports: dict) -> dict:
    """Relative error of this backend's logits on each other backend's export, against the
    exporting backend's own logits."""
    spec, _, x, _ = checks.cross_batch()
    errors = {}
    for source, exported in exports.items():
        model = backend.build(spec)
        backend.load_state(model, weights.load_state(exported["path"], spec))
        logits = backend.forward(model, specs.to_layout(x, backend.layout), train=False)
        errors[source] = checks.relative_error(logits, np.asarray(exported["logits"]))
    return errors


def zoo_export(backend, out_dir: Path) -> dict:
    """For each zoo format this backend's framework owns: a small zoo model's file (made by the
    zoo's own code), converted to canonical, with the zoo model's logits on the sample batch."""
    exports = {}
    for fmt, (spec, size) in zoo.SAMPLES.items():
        if zoo.OWNERS[fmt] != backend.name:
            continue
        src = out_dir / "zoo" / f"{spec.name}{zoo.SAMPLE_SUFFIX[fmt]}"
        src.parent.mkdir(parents=True, exist_ok=True)
        logits = zoo.owner(fmt).zoo_sample(src, spec, zoo.sample_images(size))
        canonical = out_dir / "zoo" / f"{fmt}.safetensors"
        zoo.convert(src, canonical)
        exports[fmt] = {"file": str(src), "canonical": str(canonical), "size": size, "logits": logits.tolist()}
    return exports


def zoo_reproduce(backend, out_dir: Path) -> dict:
    """Relative error of this backend's logits on each converted zoo file, against the zoo model's."""
    errors = {}
    for result in sorted(out_dir.glob("*.json")):
        for fmt, exported in json.loads(result.read_text()).get("zoo_export", {}).items():
            spec = weights.spec_of_checkpoint(exported["canonical"])
            model = backend.build(spec)
            backend.load_state(model, weights.load_state(exported["canonical"], spec))
            x = specs.to_layout(zoo.sample_images(exported["size"]), backend.layout)
            errors[fmt] = checks.relative_error(backend.forward(model, x, train=False), np.asarray(exported["logits"]))
    return errors


def train_recipe(backend, recipe_name: str, out_dir: Path, data_dir) -> dict:
    if recipe_name != "quick" and backend.requested_device == "gpu" and backend.device_name.startswith("cpu"):
        recipe_name = "quick"  # a backend that fell back to the CPU would take hours on the GPU recipe
    recipe = training.get_recipe(recipe_name)
    run_dir = out_dir / "train" / backend.name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # conformance always trains from the start
    return training.train(backend, "d2l", recipe, run_dir, data_dir, progress=False)


def train_trajectory(backend, out_dir: Path, data_dir) -> dict:
    """The float64 trajectory of the conformance setup (conformance/trajectory.py), with and
    without momentum, saved for the report to compare with the other backends and the reference."""
    start = time.perf_counter()
    setup = trajectory.get_setup(trajectory.CONFORMANCE)
    paths = trajectory.backend_runs(backend, setup, out_dir / "trajectory", ("float64",), data_dir)
    return {"setup": setup.name, "files": [str(p) for p in paths], "seconds": time.perf_counter() - start}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True)
    parser.add_argument("--phase", choices=("checks", "cross"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--matrix", default="[]", help="JSON list of checks.Config fields")
    parser.add_argument(
        "--memory-efficient", default="[]", help="JSON list of checks.Config fields, checked memory-efficient"
    )
    parser.add_argument(
        "--conditioning", default="{}", help="JSON {ARCH@SIZE: checks.float32_conditioning}, measured once"
    )
    parser.add_argument("--recipe", default="", help="training recipe; empty: no training")
    parser.add_argument("--data-dir")
    parser.add_argument("--exports", default="{}", help="JSON {backend: export} for phase cross")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    path = out_dir / f"{args.backend}.json"
    start = time.perf_counter()
    try:
        backend = load_backend(args.backend, args.device)
    except BackendUnavailable as error:
        merge_json(path, {"status": "skipped", "reason": str(error)})
        return 0
    merge_json(
        path,
        {
            "status": "ok",
            "device": backend.device_name,
            "device_note": backend.device_note,
            "layout": backend.layout,
            "running_var": backend.running_var,
            "float32_hyperparameters": backend.float32_hyperparameters,
        },
    )
    try:
        if args.phase == "checks":  # each part is saved as soon as it is measured
            conditioning = json.loads(args.conditioning)
            rows = run_matrix(backend, json.loads(args.matrix), conditioning)
            merge_json(path, {"rows": rows})
            rows += run_memory_efficient(backend, json.loads(args.memory_efficient), conditioning)
            merge_json(path, {"rows": rows})
            merge_json(path, {"rows": rows + run_precisions(backend)})
            merge_json(path, {"export": export_for_cross(backend, out_dir)})
            merge_json(path, {"zoo_export": zoo_export(backend, out_dir)})
            if args.recipe:
                merge_json(path, {"training": train_recipe(backend, args.recipe, out_dir, args.data_dir)})
                merge_json(path, {"trajectory": train_trajectory(backend, out_dir, args.data_dir)})
            merge_json(path, {"seconds_checks": time.perf_counter() - start})
        else:
            merge_json(
                path,
                {
                    "cross": cross_load(backend, json.loads(args.exports)),
                    "zoo": zoo_reproduce(backend, out_dir),
                    "seconds_cross": time.perf_counter() - start,
                },
            )
            merge_json(path, {"onnx": onnx.measure(backend, out_dir)})  # run in onnxruntime by the report
    except Exception as error:  # reported for this backend; the others go on
        merge_json(
            path,
            {
                "status": "error",
                "phase": args.phase,
                "reason": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(),
            },
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
