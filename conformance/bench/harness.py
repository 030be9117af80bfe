"""`densenet-xf bench`: every measurement in its own process, on the same data, then a report.

Section `speed`: for each shape (the quick recipe's on the CPU; the d2l recipe's and
densenet121 at 224x224 on a GPU), for each backend: the d2l book's loop for its framework
(the anchor), the book's model with a compiled step where the book leaves it eager, then the
project's trainer in each precision; all of them `repeats` times, round-robin, so that a
drift of the machine's speed falls on every row alike. A measurement during which other work
took CPU time is flagged and run once more. Section `memory`: for each backend,
densenet121's trainer plain and memory-efficient, each in a process of its own, since peak
memory is per process. Section `scaling`: 1 device against 2, data-parallel. The data set is
written once per shape, as uint8 .npy files, and every measurement steps through the same
seeded index batches of it. Every worker compiles with an empty compilation cache, so that
first steps compare like with like.
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

RUNS = ("anchor", "anchor_compiled", *PRECISIONS)
SECTIONS = ("speed", "memory", "scaling")
MEMORY_MODES = ("plain", "memory_efficient")
MEMORY_PRECISION = "tf32"  # the trainer's fast default (plain fp32 on a CPU), as a user trains
WORKER_TIMEOUT_S = 900
REPEATS = 3  # per speed measurement, round-robin


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
# Section scaling: the trainer on 1 device, then data-parallel on 2 (simulated CPU devices share
# the same cores: there the ratio is the engine's overhead, not a speed-up).
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


def fresh_caches(directory: Path) -> dict:
    """Environment variables that point every framework's compilation cache at an empty folder."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return {
        "JAX_COMPILATION_CACHE_DIR": str(directory / "jax"),
        "TORCHINDUCTOR_CACHE_DIR": str(directory / "torchinductor"),
        "TRITON_CACHE_DIR": str(directory / "triton"),
    }


def gpu_count() -> int:
    """NVIDIA GPUs visible to this process (nvidia-smi, narrowed by CUDA_VISIBLE_DEVICES)."""
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    found = len([line for line in done.stdout.splitlines() if line.startswith("GPU ")]) if done.returncode == 0 else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return found if visible is None else min(found, len([v for v in visible.split(",") if v.strip()]))


def _worker(backend, run, shape, data_path, device, warmup, steps, compile, out_dir, mode=None, repeat=0) -> dict:
    """One measurement in a process of its own; `mode` is a memory mode, or a device count."""
    devices = mode if isinstance(mode, int) else 1
    name = f"{shape.arch}-{shape.size}-{backend}-{run}" + (f"-{mode}" if mode not in (None, "plain") else "")
    name += f"-{repeat}" if repeat else ""
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
        + (["--activations"] if mode in MEMORY_MODES else [])
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **fresh_caches(out_dir / "caches" / name)}
    with open(log, "w") as stream:
        if devices > 1:  # the framework's launcher (torchrun for PyTorch), in a fresh process
            code = engines.launch(
                backend, devices, module_args, WORKER_TIMEOUT_S, env, stdout=stream, stderr=subprocess.STDOUT
            )
        else:
            try:
                code = subprocess.run(
                    [sys.executable, *module_args],
                    stdout=stream,
                    stderr=subprocess.STDOUT,
                    timeout=WORKER_TIMEOUT_S,
                    env=env,
                ).returncode
            except subprocess.TimeoutExpired:
                code = None
        code = None if code == -1 else code
    shutil.rmtree(out_dir / "caches" / name, ignore_errors=True)
    if result_path.is_file():
        return json.loads(result_path.read_text())
    why = f"timed out after {WORKER_TIMEOUT_S} s" if code is None else f"worker exited with code {code}"
    tail = log.read_text(errors="replace")[-2000:]
    return {"status": "error", "reason": f"{why}; log: {log}", "traceback": tail}


def _skip_reason(rows, backend, shape, device) -> str | None:
    """Why the rest of a backend's measurements need not run: its framework is missing, or
    on a GPU run it fell back to the CPU on an earlier shape (one shape shows that)."""
    trainer = [row for row in rows if row["backend"] == backend and row["run"] in PRECISIONS]
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
    repeats=None,
) -> int:
    """Measure the `sections`: speed writes bench.json, bench.md and bench.png in `out_dir`,
    memory memory_<device>.json/.md/.png, scaling scaling_<device>.*; non-zero if a
    measurement crashed. `repeats` applies to the speed section (default REPEATS, 1 with `quick`)."""
    check_device(device)
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown or not sections:
        raise ValueError(f"bench sections must be among {', '.join(SECTIONS)}; got {', '.join(sections) or 'none'}")
    repeats = (1 if quick else REPEATS) if repeats is None else repeats
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    backends = list(backends or backend_names())
    speed_steps = _steps(QUICK_STEPS if quick else STEPS[device], warmup, steps)
    memory_steps = _steps(
        tuple(map(min, QUICK_STEPS, MEMORY_STEPS[device])) if quick else MEMORY_STEPS[device], warmup, steps
    )
    out_dir = Path(out_dir)
    for stale in ("runs", "logs", "data", "caches"):
        shutil.rmtree(out_dir / stale, ignore_errors=True)
    plans = {
        "speed": (report, shapes or SHAPES[device], [(b, name, None) for b in backends for name in RUNS], speed_steps),
        "memory": (
            memory_report,
            memory_shapes or MEMORY_SHAPES[device],
            [(b, MEMORY_PRECISION, mode) for b in backends for mode in MEMORY_MODES],
            memory_steps,
        ),
        "scaling": (
            scaling_report,
            shapes or SHAPES[device],
            [(b, MEMORY_PRECISION, n) for b in backends for n in SCALING_DEVICES],
            speed_steps,
        ),
    }
    too_few = device == "gpu" and gpu_count() < max(SCALING_DEVICES)
    rows = []
    for name in (section for section in SECTIONS if section in sections):
        writer, section_shapes, measurements, section_steps = plans[name]
        skip = (
            f"{gpu_count()} GPU(s) visible; scaling needs {max(SCALING_DEVICES)}"
            if name == "scaling" and too_few
            else None
        )
        rows += _section(
            writer,
            section_shapes,
            measurements,
            device,
            section_steps,
            compile,
            out_dir,
            data_dir,
            progress,
            publish,
            repeats if name == "speed" else 1,
            skip,
        )
    return 1 if any(row["status"] == "error" for row in rows) else 0


def _steps(defaults, warmup, steps) -> tuple[int, int]:
    warmup, steps = (defaults[0] if warmup is None else warmup), (defaults[1] if steps is None else steps)
    if warmup < 1 or steps < 1:
        raise ValueError(f"warm-up and measured steps must be at least 1, got {warmup} and {steps}")
    return warmup, steps


def contended(row) -> bool:
    return row.get("status") == "ok" and row.get("other_share", 0.0) > report.CONTENTION


def _section(
    writer, shapes, measurements, device, steps, compile, out_dir, data_dir, progress, publish, repeats=1, skip=None
) -> list[dict]:
    """Each (backend, run, memory mode or device count) of `measurements` on each shape in a
    worker process, `repeats` times round-robin, and once more each one that was contended;
    `writer` (report, memory_report, scaling_report) builds the section's report: `files(device)`
    names its .json, .md and .png, `markdown` and `plot` write the last two. `skip` says why the
    whole section cannot run here."""
    from tqdm.auto import tqdm

    started = time.time()
    rows = []
    bar = tqdm(total=len(shapes) * len(measurements) * repeats, desc="bench", unit="run", disable=not progress)

    def measure(shape, data_path, backend, run_name, mode, repeat):
        bar.set_description(f"bench {shape.arch}@{shape.size} {backend} {mode or run_name} #{repeat + 1}")
        reason = skip or _skip_reason(rows, backend, shape, device)
        result = (
            {"status": "skipped", "reason": reason}
            if reason
            else _worker(backend, run_name, shape, data_path, device, *steps, compile, out_dir, mode, repeat)
        )
        return {
            "shape": shape.name,
            "backend": backend,
            "run": run_name,
            **({"mode": mode} if mode is not None else {}),
            "repeat": repeat,
            **result,
        }

    try:
        for shape in shapes:
            data_path = out_dir / "data" / f"{shape.arch}-{shape.size}"
            if not skip:
                write_data(shape, data_path, data_dir)
            for repeat in range(repeats):
                for measurement in measurements:
                    rows.append(measure(shape, data_path, *measurement, repeat))
                    bar.update(1)
            for row in [row for row in rows if row["shape"] == shape.name and contended(row)]:
                row["contended"] = True  # kept in the record, left out of the medians
                again = (row["backend"], row["run"], row.get("mode"))
                rows.append(measure(shape, data_path, *again, repeats + row["repeat"]) | {"rerun_of": row["repeat"]})
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
