"""One measurement of `densenet-xf bench`, in a Python process of its own.

    python -m conformance.bench.worker --backend B --measure anchor|anchor_compiled|fp32|tf32|bf16
        --spec JSON --batch N --data DIR --device cpu|gpu --warmup W --steps N --out RESULT.json
        [--memory-efficient]

`anchor` times the d2l book's loop for B's framework (bench/anchors/B_d2l.py: `Anchor`),
`anchor_compiled` the book's model with the whole step compiled (`CompiledAnchor`, where the
book's loop leaves part of the step eager); a precision times the project's trainer. All step
through the same index batches of the same uint8 images (DIR/images.npy, DIR/labels.npy); an
anchor's batches are gathered before the clock starts, as the book's data loaders prefetch
them. The first step (compilation, allocation) and the rest of the warm-up are timed apart
from the measured steps.

Memory: on a GPU the framework allocator's peak, reset after the warm-up (where the framework
can), with the trainer's device-resident data set reported apart; on a CPU what the measured
steps add to the process's resident set (its high-water mark reset after the warm-up through
/proc/self/clear_refs, then VmHWM), and the process's whole peak for reference. Contention:
the machine's CPU time not spent by this process during the measured steps (/proc/stat), as a
share of the window's core-seconds. `--memory-efficient` builds the trainer's model with
`memory_efficient=True`; a model that says it has no mechanism for it (attribute NO_MECHANISM)
is reported "unsupported", not timed.
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
ANCHORS = ("anchor", "anchor_compiled")  # the book's loop, and the book's model with a compiled step
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
    """The book's loop: its step, and the loss handed to the host as the book's plot does it
    (`Anchor.step` returns it: a number where the book reads it every step, a device value
    where the book's plot reads it later; `sync` reads what is left)."""

    def __init__(self, module, spec, device, images, labels, compiled=False):
        if compiled and not hasattr(module, "CompiledAnchor"):
            raise NoAnchor("the book's loop for this framework already compiles its step: no second variant")
        self.anchor = (module.CompiledAnchor if compiled else module.Anchor)(anchor_arch(spec), LR, device)
        self.images, self.labels = images, labels.astype(np.int64)
        self.device_name, self.note = self.anchor.device_name, self.anchor.note
        # As a user runs it: the framework's defaults, which on a GPU include TF32 where the framework enables it.
        self.arithmetic = "fp32" if self.device_name.startswith("cpu") else "framework defaults (TF32 where on)"
        self.losses, self.sizes, self.batches = [], [], {}

    def prefetch(self, batches):
        """Gather every batch on the host before the clock starts, as the book's loaders do."""
        self.batches = {id(indices): (self.images[indices], self.labels[indices]) for indices in batches}

    def step(self, indices):
        images, labels = self.batches.get(id(indices)) or (self.images[indices], self.labels[indices])
        self.losses.append(self.anchor.step(images, labels))
        self.sizes.append(len(indices))

    def sync(self) -> tuple[float, int]:
        self.anchor.wait()  # every update of the window done, not only the losses read
        loss_sum, seen = sum(float(loss) * size for loss, size in zip(self.losses, self.sizes)), sum(self.sizes)
        self.losses, self.sizes = [], []
        return loss_sum, seen


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

    def prefetch(self, batches):
        """Nothing to do: the data set is on the device."""

    def step(self, indices):
        self.trainer.step_on(indices)

    def sync(self) -> tuple[float, int]:
        loss_sum, _, seen, _ = self.trainer.read_sums()
        return loss_sum, seen

    def activations(self, indices) -> dict:
        """The framework's own measure of what a step keeps for its backward pass, if it has one."""
        measured = self.trainer.activation_bytes(indices)
        return {} if measured is None else {"activation_bytes": measured[0], "activation_kind": measured[1]}


def busy_jiffies() -> int:
    """The machine's CPU time spent working since boot, in clock ticks (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle


def own_seconds() -> float:
    """This process's CPU time (user + system, its threads included)."""
    times = os.times()
    return times.user + times.system


class Window:
    """The measured steps' wall time, this process's CPU time and the machine's, so that
    other work on the machine (contention) shows as CPU time this process did not spend."""

    def __enter__(self):
        self.wall, self.own, self.busy = time.perf_counter(), own_seconds(), busy_jiffies()
        self.load = os.getloadavg()[0]
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.wall
        own = own_seconds() - self.own
        busy = (busy_jiffies() - self.busy) / os.sysconf("SC_CLK_TCK")
        cores = os.cpu_count() or 1
        self.cpu_share = own / (self.seconds * cores)  # of all the machine's cores
        self.other_share = max(0.0, busy - own) / (self.seconds * cores)
        return False


def time_steps(run, batches, warmup: int, memory) -> dict:
    """First step, the rest of the warm-up, then the measured steps, each ended by a sync;
    `memory` is reset after the warm-up and read after the measured steps."""
    run.prefetch(batches)
    start = time.perf_counter()
    run.step(batches[0])
    run.sync()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for indices in batches[1:warmup]:
        run.step(indices)
    run.sync()
    rest = time.perf_counter() - start
    memory.reset()
    with Window() as window:
        for indices in batches[warmup:]:
            run.step(indices)
        loss_sum, seen = run.sync()
    return {
        "first_step_s": first,
        "warmup_s": rest,
        "seconds": window.seconds,
        "examples": seen,
        "examples_per_s": seen / window.seconds,
        "loss": loss_sum / seen,
        "cpu_share": window.cpu_share,
        "other_share": window.other_share,
        "load_average": window.load,
        **memory.read(),
    }


class CpuMemory:
    """What the measured steps add to the process's resident set: the high-water mark is reset
    after the warm-up (writing 5 to /proc/self/clear_refs), then read as VmHWM."""

    kind = "process RSS added by the measured steps (VmHWM after clear_refs)"

    def reset(self):
        Path("/proc/self/clear_refs").write_text("5")
        self.base = resident_bytes()

    def read(self) -> dict:
        return {
            "added_bytes": max(0, status_bytes("VmHWM") - self.base),
            "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
            "peak_kind": self.kind,
        }


class GpuMemory:
    """The framework allocator's peak on the GPU, reset after the warm-up where the framework
    can (the anchor module of the backend's framework knows how)."""

    def __init__(self, anchor):
        self.anchor = anchor
        self.resets = hasattr(anchor, "gpu_reset_peak")

    def reset(self):
        if self.resets:
            self.anchor.gpu_reset_peak()
        self.base = self.anchor.gpu_bytes_in_use() if hasattr(self.anchor, "gpu_bytes_in_use") else None

    def read(self) -> dict:
        peak = self.anchor.gpu_peak_bytes()
        added = None if peak is None or self.base is None else max(0, peak - self.base)
        kind = "GPU allocator peak" + (", reset after the warm-up" if self.resets else " since the process started")
        return {"added_bytes": added, "peak_bytes": peak, "peak_kind": kind}


def status_bytes(field: str) -> int:
    """A /proc/self/status memory field (VmHWM, VmRSS) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"/proc/self/status has no {field}")


def resident_bytes() -> int:
    """This process's resident set size now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args) -> dict:
    spec = DenseNetSpec.from_json(args.spec)
    images = np.load(Path(args.data) / "images.npy")
    labels = np.load(Path(args.data) / "labels.npy")
    if args.measure in ANCHORS:
        run = AnchorRun(load_anchor(args.backend), spec, args.device, images, labels, args.measure == "anchor_compiled")
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
    memory = GpuMemory(load_anchor(args.backend)) if on_gpu else CpuMemory()
    batches = index_batches(len(labels), args.batch, warmup + steps)
    result = time_steps(run, batches, max(warmup, 1), memory)
    if args.activations and isinstance(run, TrainerRun):  # after the timing, which it must not disturb
        result.update(run.activations(batches[-1]))
    return {
        "status": "ok",
        "device": run.device_name,
        "device_note": run.note,
        "arithmetic": run.arithmetic,
        "warmup": max(warmup, 1),
        "steps": steps,
        **result,
        # The trainers keep the data set on the device; the anchors gather batches on the host.
        "data_bytes": int(images.nbytes + labels.nbytes) if args.measure not in ANCHORS else 0,
        "devices": args.devices,
        "bn_semantics": getattr(run, "bn_semantics", None),
        "compile_cache": os.environ.get("JAX_COMPILATION_CACHE_DIR", ""),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True)
    # not --run: torchrun, which starts the data-parallel runs, would take it for its --run-path
    parser.add_argument(
        "--measure", required=True, help="anchor, anchor_compiled, or a trainer precision (fp32, tf32, bf16)"
    )
    parser.add_argument("--spec", required=True, help="the architecture as DenseNetSpec JSON")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--data", required=True, help="directory with images.npy and labels.npy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--memory-efficient", action="store_true", help="build the model with memory_efficient=True")
    parser.add_argument(
        "--activations", action="store_true", help="also the framework's own measure of the activations kept"
    )
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
