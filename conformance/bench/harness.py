"""`densenet-xf bench`: every measurement in its own process, on the same data, then a report.

Section `speed`: for each shape (the quick recipe's on the CPU; the d2l recipe's and
densenet121 at 224x224 on a GPU), for each backend: the d2l book's code for its framework
(the anchor), then the project's trainer in each precision. Section `memory`: for each
backend, densenet121's trainer plain and memory-efficient (issue 13), each in a process of
its own, since peak memory is per process. The data set is written once per shape, as uint8
.npy files, and every measurement steps through the same seeded index batches of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import data, engines
from ..backends import backend_names
from ..interface import PRECISIONS, check_device
from ..reporting import publish_files, write_files
from ..training import RECIPES, fashion_mnist_spec
from . import memory_report, report, scaling_report

RUNS = ("anchor", *PRECISIONS)
SECTIONS = ("speed", "memory", "scaling")
MEMORY_MODES = ("plain", "memory_efficient")
MEMORY_PRECISION = "tf32"  # the trainer's fast default (plain fp32 on a CPU), as a user trains
WORKER_TIMEOUT_S = 900


@dataclass(frozen=True)
class Shape:
    arch: str
    size: int
    batch: int
    examples: int  # the first N Fashion-MNIST training images

    @property
    def name(self) -> str:
        return f"{self.arch} {self.size}x{self.size}, batch {self.batch}"


def recipe_shape(name: str) -> Shape:
    recipe = RECIPES[name]
    return Shape("d2l", recipe.size, recipe.batch_size, recipe.train_examples or data.FILES["train_labels"][2][0])


SHAPES = {  # the quick recipe's on a CPU; on a GPU the d2l recipe's and densenet121 at ImageNet's size
    "cpu": [recipe_shape("quick")],
    "gpu": [recipe_shape("d2l"), Shape("densenet121", 224, 128, 12800)],
}
# (warm-up steps, measured steps): a full CPU run of the four backends stays near ten minutes on two cores.
STEPS = {"cpu": (5, 30), "gpu": (20, 200)}
QUICK_STEPS = (2, 5)
MEMORY_SHAPES = {  # densenet121: on the CPU at a size two cores step through in seconds, on a GPU at ImageNet's
    "cpu": [Shape("densenet121", 64, 32, 128)],
    "gpu": [Shape("densenet121", 224, 128, 1024)],
}
MEMORY_STEPS = {"cpu": (1, 3), "gpu": (5, 20)}  # one warm-up step: the first, timed apart
# Section scaling (issue 16): the trainer on 1 device, then data-parallel on 2 (simulated CPU
# devices share the same cores: there the ratio is the engine's overhead, not a speed-up).
SCALING_DEVICES = (1, 2)


def shapes_for(device, arch=None, size=None, batch=None, examples=None, table=SHAPES) -> list[Shape]:
    """The device's shapes in `table` (SHAPES, MEMORY_SHAPES), or one shape built from the
    overrides (tests use a tiny net)."""
    if arch is None and size is None and batch is None and examples is None:
        return table[device]
    first = table[device][0]
    batch = batch or first.batch
    shape = Shape(arch or first.arch, size or first.size, batch, examples or max(first.examples, batch))
    if shape.examples < shape.batch:
        raise ValueError(f"--examples {shape.examples} is smaller than one batch of {shape.batch}")
    from ..specs import check_input_size

    check_input_size(fashion_mnist_spec(shape.arch), shape.size)
    return [shape]


def write_data(shape: Shape, directory: Path, data_dir=None) -> None:
    """The shape's training images (uint8, resized) and labels, once, for every worker."""
    if shape.size <= 96:  # cached by data.load_resized
        d = data.load_resized(shape.size, data_dir)
        images, labels = d["train_images"][: shape.examples], d["train_labels"][: shape.examples]
    else:  # resize only the subset: a cached 224x224 copy of all 70,000 would take 3.5 GB
        d = data.load_fashion_mnist(data_dir)
        images = data.resize_images(d["train_images"][: shape.examples], shape.size)
        labels = d["train_labels"][: shape.examples]
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "images.npy", np.ascontiguousarray(images))
    np.save(directory / "labels.npy", np.ascontiguousarray(labels))


def _worker(backend, run, shape, data_path, device, warmup, steps, compile, out_dir, mode=None) -> dict:
    """One measurement in a process of its own; `mode` is a memory mode, or a device count."""
    devices = mode if isinstance(mode, int) else 1
    name = f"{shape.arch}-{shape.size}-{backend}-{run}" + (f"-{mode}" if mode not in (None, "plain") else "")
    result_path, log = out_dir / "runs" / f"{name}.json", out_dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    module_args = (
        [
            "-m",
            "conformance.bench.worker",
            "--backend",
            backend,
            "--measure",
            run,
            "--spec",
            fashion_mnist_spec(shape.arch).to_json(),
            "--batch",
            str(shape.batch),
            "--data",
            str(data_path),
            "--device",
            device,
            "--warmup",
            str(warmup),
            "--steps",
            str(steps),
            "--devices",
            str(devices),
            "--out",
            str(result_path),
        ]
        + (["--compile"] if compile else [])
        + (["--memory-efficient"] if mode == "memory_efficient" else [])
    )
    with open(log, "w") as stream:
        if devices > 1:  # the framework's launcher (torchrun for PyTorch), in a fresh process
            code = engines.launch(
                backend, devices, module_args, WORKER_TIMEOUT_S, stdout=stream, stderr=subprocess.STDOUT
            )
        else:
            try:
                code = subprocess.run(
                    [sys.executable, *module_args],
                    stdout=stream,
                    stderr=subprocess.STDOUT,
                    timeout=WORKER_TIMEOUT_S,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                ).returncode
            except subprocess.TimeoutExpired:
                code = None
        code = None if code == -1 else code
    if result_path.is_file():
        return json.loads(result_path.read_text())
    why = f"timed out after {WORKER_TIMEOUT_S} s" if code is None else f"worker exited with code {code}"
    tail = log.read_text(errors="replace")[-2000:]
    return {"status": "error", "reason": f"{why}; log: {log}", "traceback": tail}


def _skip_reason(rows, backend, shape, device) -> str | None:
    """Why the rest of a backend's measurements need not run: its framework is missing, or
    on a GPU run it fell back to the CPU on an earlier shape (one shape shows that)."""
    trainer = [row for row in rows if row["backend"] == backend and row["run"] != "anchor"]
    missing = [row for row in trainer if row["status"] == "skipped"]
    if missing:
        return missing[0]["reason"]
    earlier = [row for row in rows if row["backend"] == backend and row["shape"] != shape.name]
    if device == "gpu" and any(row["status"] == "ok" and row["device"].startswith("cpu") for row in earlier):
        return f"{backend} ran on the CPU on an earlier shape of this GPU run; not measured at this size"
    return None


def run(
    out_dir="build/bench",
    device="cpu",
    backends=None,
    warmup=None,
    steps=None,
    quick=False,
    shapes=None,
    compile=False,
    data_dir=None,
    publish=None,
    progress=True,
    sections=SECTIONS,
    memory_shapes=None,
) -> int:
    """Measure the `sections`: speed writes bench.json, bench.md and bench.png in `out_dir`,
    memory memory_<device>.json/.md/.png; non-zero if a measurement crashed."""
    check_device(device)
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown or not sections:
        raise ValueError(f"bench sections must be among {', '.join(SECTIONS)}; got {', '.join(sections) or 'none'}")
    backends = list(backends or backend_names())
    speed_steps = _steps(QUICK_STEPS if quick else STEPS[device], warmup, steps)
    memory_steps = _steps(
        tuple(map(min, QUICK_STEPS, MEMORY_STEPS[device])) if quick else MEMORY_STEPS[device], warmup, steps
    )
    out_dir = Path(out_dir)
    for stale in ("runs", "logs", "data"):
        shutil.rmtree(out_dir / stale, ignore_errors=True)
    rows = []
    if "speed" in sections:
        measurements = [(backend, name, None) for backend in backends for name in RUNS]
        rows += _section(
            report,
            shapes or SHAPES[device],
            measurements,
            device,
            speed_steps,
            compile,
            out_dir,
            data_dir,
            progress,
            publish,
        )
    if "memory" in sections:
        measurements = [(backend, MEMORY_PRECISION, mode) for backend in backends for mode in MEMORY_MODES]
        rows += _section(
            memory_report,
            memory_shapes or MEMORY_SHAPES[device],
            measurements,
            device,
            memory_steps,
            compile,
            out_dir,
            data_dir,
            progress,
            publish,
        )
    if "scaling" in sections:
        measurements = [(backend, MEMORY_PRECISION, devices) for backend in backends for devices in SCALING_DEVICES]
        rows += _section(
            scaling_report,
            shapes or SHAPES[device],
            measurements,
            device,
            speed_steps,
            compile,
            out_dir,
            data_dir,
            progress,
            publish,
        )
    return 1 if any(row["status"] == "error" for row in rows) else 0


def _steps(defaults, warmup, steps) -> tuple[int, int]:
    warmup, steps = (defaults[0] if warmup is None else warmup), (defaults[1] if steps is None else steps)
    if warmup < 1 or steps < 1:
        raise ValueError(f"warm-up and measured steps must be at least 1, got {warmup} and {steps}")
    return warmup, steps


def _section(writer, shapes, measurements, device, steps, compile, out_dir, data_dir, progress, publish) -> list[dict]:
    """Each (backend, run, memory mode or None) of `measurements` on each shape in a worker
    process; `writer` (report, memory_report, scaling_report) builds the section's report:
    `files(device)` names its .json, .md and .png, `markdown` and `plot` write the last two."""
    from tqdm.auto import tqdm

    started = time.time()
    rows = []
    bar = tqdm(total=len(shapes) * len(measurements), desc="bench", unit="run", disable=not progress)
    try:
        for shape in shapes:
            data_path = out_dir / "data" / f"{shape.arch}-{shape.size}"
            write_data(shape, data_path, data_dir)
            for backend, run_name, mode in measurements:
                bar.set_description(f"bench {shape.arch}@{shape.size} {backend} {mode or run_name}")
                reason = _skip_reason(rows, backend, shape, device)
                result = (
                    {"status": "skipped", "reason": reason}
                    if reason
                    else _worker(backend, run_name, shape, data_path, device, *steps, compile, out_dir, mode)
                )
                rows.append(
                    {
                        "shape": shape.name,
                        "backend": backend,
                        "run": run_name,
                        **({"mode": mode} if mode is not None else {}),
                        **result,
                    }
                )
                bar.update(1)
            shutil.rmtree(data_path, ignore_errors=True)
    finally:
        bar.close()
        shutil.rmtree(out_dir / "data", ignore_errors=True)
    result = writer.build(
        rows, device, [asdict(s) | {"name": s.name} for s in shapes], *steps, compile, seconds=time.time() - started
    )
    json_name, md_name, png_name = names = writer.files(device)
    write_files(out_dir, result, json_name, md_name, writer.markdown, {png_name: writer.plot})
    print(writer.markdown(result))
    print(f"bench: {', '.join(str(out_dir / name) for name in names)}")
    if publish:
        publish_files(out_dir, publish, names)
        print(f"published to {publish}")
    return rows
