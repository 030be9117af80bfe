"""One measurement of `densenet-xf bench`, in a Python process of its own.

    python -m conformance.bench.worker --backend B --run anchor|fp32|tf32|bf16 --config JSON
        --data DIR --device cpu|gpu --warmup W --steps N --out RESULT.json [--memory-efficient]

`anchor` times the d2l book's code for B's framework (bench/anchors/B_d2l.py); a precision
times the project's trainer. Both step through the same index batches of the same uint8
images (DIR/images.npy, DIR/labels.npy). The first step (compilation, allocation) and the
rest of the warm-up are timed apart from the measured steps. Peak memory is the framework
allocator's peak on a GPU, else this process's peak resident set size; a process of its own
per measurement keeps one from inflating the next. `--memory-efficient` builds the trainer's
model with `memory_efficient=True`; a model that says it has no mechanism for it (attribute
NO_MECHANISM) is reported "unsupported", not timed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from .. import data, engines, weights
from ..backends import load_backend
from ..files import repository_path, write_json
from ..interface import BackendUnavailable
from ..specs import DenseNetSpec

LR = 0.1
# A GPU run whose backend fell back to the CPU (MXNet on Hopper) takes only a few steps.
CPU_FALLBACK_STEPS = (1, 3)
# A memory-efficient model whose framework offers no way to recompute sets this attribute to the reason.
NO_MECHANISM = "memory_efficient_unsupported"


class Unsupported(RuntimeError):
    """The backend's memory-efficient model has no mechanism in its framework."""


class NoAnchor(RuntimeError):
    """No anchor script for this backend, or its framework cannot be imported."""


def load_anchor(backend: str):
    """bench/anchors/BACKEND_d2l.py as a module; NoAnchor if it is missing or cannot import."""
    try:
        path = repository_path("bench", "anchors", what="the d2l book's code (bench/anchors/)") / f"{backend}_d2l.py"
    except FileNotFoundError as error:
        raise NoAnchor(str(error)) from None
    if not path.is_file():
        raise NoAnchor(f"no anchor for backend {backend!r} (expected {path})")
    spec = importlib.util.spec_from_file_location(f"bench_anchor_{backend}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as error:
        raise NoAnchor(f"the {backend} anchor cannot import its framework: {error}") from error
    return module


def anchor_arch(spec: DenseNetSpec) -> dict:
    """The anchors' keyword arguments (the book's names) for `spec`."""
    if spec.stem != "imagenet" or spec.compression != 0.5 or spec.drop_rate:
        raise ValueError(
            f"the d2l anchors build the book's 7x7 stem and halving transitions without dropout; "
            f"{spec.name} has stem {spec.stem!r}, compression {spec.compression}, drop rate {spec.drop_rate}"
        )
    return {
        "num_channels": spec.num_init_features,
        "growth_rate": spec.growth_rate,
        "arch": list(spec.block_config),
        "in_channels": spec.in_channels,
        "num_classes": spec.num_classes,
        "bn_size": spec.bn_size,
        "bias": spec.conv_bias,
    }


def index_batches(num_examples: int, batch: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` full batches of indices in the shared seeded order, epoch after epoch."""
    out, epoch = [], 1
    while len(out) < count:
        order = data.epoch_order(num_examples, seed, epoch)
        out += [order[i : i + batch] for i in range(0, len(order) - batch + 1, batch)]
        epoch += 1
    return out[:count]


class AnchorRun:
    """The book's step, which reads loss and accuracy on the host every step."""

    def __init__(self, module, spec, device, images, labels):
        self.anchor = module.Anchor(anchor_arch(spec), LR, device)
        self.images, self.labels = images, labels.astype(np.int64)
        self.device_name, self.note = self.anchor.device_name, self.anchor.note
        # As a user runs it: the framework's defaults, which on a GPU include TF32 where the framework enables it.
        self.arithmetic = "fp32" if self.device_name.startswith("cpu") else "framework defaults (TF32 where on)"
        self.loss_sum = self.seen = 0

    def step(self, indices):
        loss, _ = self.anchor.step(self.images[indices], self.labels[indices])
        self.loss_sum, self.seen = self.loss_sum + loss, self.seen + len(indices)

    def sync(self) -> tuple[float, int]:
        out, (self.loss_sum, self.seen) = (self.loss_sum, self.seen), (0, 0)
        return out


class TrainerRun:
    """The project's trainer: data on the device, one host read per `sync`."""

    def __init__(
        self, backend_name, precision, compile, spec, device, images, labels, memory_efficient=False, devices=1
    ):
        if devices > 1:  # data-parallel: simulated CPU devices exist only if made before the framework starts
            backend, _ = engines.prepare(backend_name, devices, device)
        else:
            backend = load_backend(backend_name, device)
        model = backend.build(spec, memory_efficient=memory_efficient)
        if memory_efficient and getattr(model, NO_MECHANISM, None):
            raise Unsupported(getattr(model, NO_MECHANISM))
        backend.load_state(model, weights.init_state(spec, 0))
        self.trainer = (
            engines.make_trainer(backend, model, LR, 0.0, precision, devices)
            if devices > 1
            else backend.make_trainer(model, LR, 0.0, precision=precision, compile=compile)
        )
        self.bn_semantics = getattr(self.trainer, "bn_semantics", "sync")
        self.trainer.set_data(images, labels)
        self.device_name, self.note, self.arithmetic = backend.device_name, backend.device_note, self.trainer.arithmetic

    def step(self, indices):
        self.trainer.step_on(indices)

    def sync(self) -> tuple[float, int]:
        loss_sum, _, seen, _ = self.trainer.read_sums()
        return loss_sum, seen


def time_steps(run, batches, warmup: int) -> dict:
    """First step, the rest of the warm-up, then the measured steps, each ended by a sync."""
    start = time.perf_counter()
    run.step(batches[0])
    run.sync()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for indices in batches[1:warmup]:
        run.step(indices)
    run.sync()
    rest = time.perf_counter() - start
    start = time.perf_counter()
    for indices in batches[warmup:]:
        run.step(indices)
    loss_sum, seen = run.sync()
    seconds = time.perf_counter() - start
    return {
        "first_step_s": first,
        "warmup_s": rest,
        "seconds": seconds,
        "examples": seen,
        "examples_per_s": seen / seconds,
        "loss": loss_sum / seen,
    }


def peak_memory(backend: str, on_gpu: bool) -> tuple[int, str]:
    """The framework allocator's peak on a GPU (the framework's anchor module knows how to ask
    for it), else this process's peak resident set size."""
    gpu = None
    if on_gpu:
        try:
            gpu = load_anchor(backend).gpu_peak_bytes()
        except NoAnchor:
            pass
    if gpu is not None:
        return gpu, "GPU allocator peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"  # Linux: KiB


def resident_bytes() -> int:
    """This process's resident set size now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args) -> dict:
    spec = DenseNetSpec.from_json(args.spec)
    images = np.load(Path(args.data) / "images.npy")
    labels = np.load(Path(args.data) / "labels.npy")
    if args.measure == "anchor":
        run = AnchorRun(load_anchor(args.backend), spec, args.device, images, labels)
    else:
        run = TrainerRun(
            args.backend,
            args.measure,
            args.compile,
            spec,
            args.device,
            images,
            labels,
            args.memory_efficient,
            args.devices,
        )
    warmup, steps = args.warmup, args.steps
    on_gpu = not run.device_name.startswith("cpu")
    if args.device == "gpu" and not on_gpu:
        warmup, steps = min(warmup, CPU_FALLBACK_STEPS[0]), min(steps, CPU_FALLBACK_STEPS[1])
    before, kind = peak_memory(args.backend, on_gpu)
    before = resident_bytes() if "RSS" in kind else before  # the model, its trainer and the data set
    result = time_steps(run, index_batches(len(labels), args.batch, warmup + steps), max(warmup, 1))
    peak, kind = peak_memory(args.backend, on_gpu)
    return {
        "status": "ok",
        "device": run.device_name,
        "device_note": run.note,
        "arithmetic": run.arithmetic,
        "warmup": max(warmup, 1),
        "steps": steps,
        **result,
        "peak_bytes": peak,
        "peak_kind": kind,
        "before_steps_bytes": before,
        "devices": args.devices,
        "bn_semantics": getattr(run, "bn_semantics", None),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True)
    # not --run: torchrun, which starts the data-parallel runs, would take it for its --run-path
    parser.add_argument("--measure", required=True, help="anchor, or a trainer precision (fp32, tf32, bf16)")
    parser.add_argument("--spec", required=True, help="the architecture as DenseNetSpec JSON")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--data", required=True, help="directory with images.npy and labels.npy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--memory-efficient", action="store_true", help="build the model with memory_efficient=True")
    parser.add_argument(
        "--devices",
        type=int,
        default=1,
        help="data-parallel over N devices (started by the framework's launcher: conformance.engines)",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        result = measure(args)
    except (BackendUnavailable, NoAnchor) as error:
        result = {"status": "skipped", "reason": str(error)}
    except Unsupported as error:
        result = {"status": "unsupported", "reason": str(error)}
    except Exception as error:  # reported in the table; the other measurements go on
        result = {"status": "error", "reason": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    if engines.process_index() == 0:  # torchrun's other ranks measured the same steps
        write_json(args.out, result)
    return 0 if result["status"] != "error" else 1


if __name__ == "__main__":
    sys.exit(main())
