"""Training on Fashion-MNIST, the same way in every backend.

The loop is framework-free: identical batches in identical order from shared code, the same
canonical initial weights, and each backend's own train step (`Trainer.train_step`). Every
epoch ends with a commit: the canonical checkpoint and the optimiser state are written
(atomically, under names that carry the epoch), then `metrics.json`, which names them, is
replaced atomically. `--resume` continues after the last committed epoch, so a run killed at
any point loses at most the epoch in progress, and resumes into exactly the same batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import data, engines, weights
from .files import atomic_write_text
from .specs import DenseNetSpec, get_spec, to_layout


@dataclass(frozen=True)
class Recipe:
    name: str
    size: int  # input height and width
    batch_size: int
    lr: float
    momentum: float
    epochs: int
    train_examples: int | None = None  # None: all 60,000
    test_examples: int | None = None  # None: all 10,000
    seed: int = 0  # initial weights and data order
    # Accuracy conformance: every backend must reach min_test_acc; the backends' final test
    # accuracies may differ by at most max_spread, their last-epoch mean training losses by
    # at most max_loss_spread (None: not checked).
    min_test_acc: float = 0.0
    max_spread: float = 1.0
    max_loss_spread: float | None = None

    def replace(self, **changes) -> Recipe:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


QUICK_SEED_STD = 0.0296  # the quick recipe's, pooled over the four backends (see the recipe)

RECIPES = {
    # Dive into Deep Learning's DenseNet chapter, first edition (section 7.7, "Densely Connected
    # Networks", d2l.ai 0.17; `lr, num_epochs, batch_size = 0.1, 10, 256` and
    # `load_data_fashion_mnist(batch_size, resize=96)`, trained by `train_ch6`): plain SGD, lr
    # 0.1, batch 256, 10 epochs, images resized to 96x96. The book's published runs of it reach
    # test accuracies of 0.876 to 0.909; these targets are not yet measured on a GPU here.
    "d2l": Recipe("d2l", size=96, batch_size=256, lr=0.1, momentum=0.0, epochs=10, min_test_acc=0.90, max_spread=0.01),
    # The same chapter, second edition (section 8.7, d2l.ai 1.0; `model = DenseNet(lr=0.01)`,
    # `d2l.Trainer(max_epochs=10)`, `d2l.FashionMNIST(batch_size=128, resize=(96, 96))`; the
    # book's Classifier steps plain SGD): lr 0.01, batch 128, 10 epochs, 96x96. A tenth of the
    # first edition's rate, so it trains more slowly: targets looser than the d2l recipe's, not
    # yet measured on a GPU here.
    "d2l2": Recipe(
        "d2l2", size=96, batch_size=128, lr=0.01, momentum=0.0, epochs=10, min_test_acc=0.85, max_spread=0.02
    ),
    # Minutes on two CPU cores for all four backends: the same net at 32x32 (its smallest
    # comfortable size is 29), a fixed subset, two epochs. Its final test accuracy is noisy:
    # `densenet-xf accuracy --recipe quick --seeds 10` (docs/results/accuracy_cpu.md, 2026-12-07)
    # measured means of 0.789-0.792 in the four backends, with no difference beyond seed noise
    # (Kruskal-Wallis p = 0.96), and a pooled seed standard deviation of 0.0296 (QUICK_SEED_STD).
    # Hence: at least 0.70 (seven times chance; the lowest of the 40 runs was 0.723); accuracies
    # within accuracy_tolerance(QUICK_SEED_STD, 4) = 4.40 x 0.0296 = 0.130, which four backends
    # training alike exceed once in a hundred runs (the rule of 0.10 it replaces, 3.4 standard
    # deviations, would fail such backends in 8% of runs); training losses within 0.02 (the
    # backends share seed and batches; they measured within 0.005). 4,000 images an epoch would
    # train a third faster, but measured too noisy for that floor (training.seed_spread of this
    # recipe with train_examples=4000, torch, seeds 0-9: mean 0.746, standard deviation 0.064,
    # minimum 0.64; measured 2026-11-23).
    "quick": Recipe(
        "quick",
        size=32,
        batch_size=64,
        lr=0.1,
        momentum=0.0,
        epochs=2,
        train_examples=6000,
        test_examples=2000,
        min_test_acc=0.70,
        max_spread=0.130,  # accuracy_tolerance(QUICK_SEED_STD, 4), rounded (tests/test_accuracy.py)
        max_loss_spread=0.02,
    ),
}


# The float32 accuracy rule of `make conformance` (the recipe's max_spread): in float32 the
# backends' trajectories part after a few steps (docs/training_parity.md), so each backend's
# final accuracy scatters like a seed's, and the range of k of them is k seed draws' range. If
# they train alike, that range exceeds q(1 - ACCURACY_FALSE_ALARM; k) seed standard deviations
# with probability ACCURACY_FALSE_ALARM, q the studentized range's quantile at infinite degrees
# of freedom (the seed standard deviation is measured, not estimated from the k runs).
ACCURACY_FALSE_ALARM = 0.01


def accuracy_tolerance(seed_std: float, backends: int = 4, false_alarm: float = ACCURACY_FALSE_ALARM) -> float:
    """The largest range of `backends` final accuracies that backends training alike exceed with
    probability at most `false_alarm`, each scattering with the seed standard deviation `seed_std`."""
    from scipy.stats import studentized_range

    return float(studentized_range.ppf(1 - false_alarm, backends, np.inf) * seed_std)


class TrainingError(RuntimeError):
    """A run directory that cannot be started or resumed as asked."""


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; valid names: {', '.join(RECIPES)}") from None


def fashion_mnist_spec(arch) -> DenseNetSpec:
    """`arch` with one input channel and ten classes, as Fashion-MNIST needs."""
    return get_spec(arch).replace(in_channels=1, num_classes=10)


def load_dataset(recipe: Recipe, data_dir=None):
    """(train images, train labels, test images, test labels) at the recipe's size and subset."""
    d = data.load_resized(recipe.size, data_dir)
    train = slice(None, recipe.train_examples)
    test = slice(None, recipe.test_examples)
    return d["train_images"][train], d["train_labels"][train], d["test_images"][test], d["test_labels"][test]


# Test-set batches of one shape: 500 divides the quick recipe's 2,000 test images and all 10,000,
# and each further shape is one more compilation in JAX and one more trace in TF.
EVAL_BATCH = 500


def evaluate_accuracy(trainer, backend, images, labels, batch_size: int = EVAL_BATCH) -> float:
    correct = 0
    for x, y in data.batches(images, labels, batch_size):
        correct += int((trainer.predict(to_layout(x, backend.layout)).argmax(axis=1) == y).sum())
    return correct / len(labels)


class Run:
    """The files of one training run in `out_dir`, and the lock that keeps a second process
    from writing into it at the same time."""

    LOCK_NAME = ".lock"

    def __init__(self, out_dir):
        self.dir = Path(out_dir)
        self.metrics_path = self.dir / "metrics.json"
        self.model_path = self.dir / "model.safetensors"
        self._lock = None

    def checkpoint(self, epoch: int) -> Path:
        return self.dir / "checkpoints" / f"epoch-{epoch:03d}.safetensors"

    def optimizer(self, epoch: int) -> Path:
        return self.dir / "checkpoints" / f"epoch-{epoch:03d}.optimizer.safetensors"

    def lock(self) -> None:
        """Take the run directory's lock, held until this Run (and every other Run of this
        process on the same directory) is gone or `release()` is called. The kernel drops an
        flock when its process dies, so a lock left by a killed run never blocks."""
        key = str(self.dir.resolve())
        self._lock = _HELD_LOCKS.get(key) or _RunLock(self.dir / self.LOCK_NAME)
        _HELD_LOCKS[key] = self._lock

    def release(self) -> None:
        self._lock = None

    def read(self) -> dict | None:
        if not self.metrics_path.is_file():
            return None
        try:
            return json.loads(self.metrics_path.read_text())
        except ValueError as error:
            raise TrainingError(
                f"{self.metrics_path} is not valid JSON ({error}); move the run directory aside"
            ) from error

    def commit(self, record: dict, backend, model, trainer, spec) -> None:
        """Write the epoch's files, then metrics.json (the commit point), which records their
        SHA-256 so that a file damaged later is caught on resume."""
        last = record["epochs"][-1]
        metadata = {"epoch": str(last["epoch"]), "backend": backend.name, "recipe": json.dumps(record["recipe"])}
        state = backend.export_state(model)
        weights.save_state(self.checkpoint(last["epoch"]), state, spec, metadata)
        weights.save_arrays(self.optimizer(last["epoch"]), trainer.export_optimizer_state(), metadata)
        weights.save_state(self.model_path, state, spec, metadata)
        last["sha256"] = {path.name: _sha256(path) for path in self.epoch_files(last["epoch"])}
        atomic_write_text(self.metrics_path, json.dumps(record, indent=2))

    def epoch_files(self, epoch: int) -> tuple[Path, Path]:
        return self.checkpoint(epoch), self.optimizer(epoch)

    def damage(self, entry: dict, spec) -> str | None:
        """Why an epoch's checkpoint or optimiser file cannot be resumed from (None: intact)."""
        checkpoint, optimizer = self.epoch_files(entry["epoch"])
        for path in (checkpoint, optimizer):
            if not path.is_file():
                return f"{path} is missing"
            recorded = entry.get("sha256", {}).get(path.name)
            if recorded and _sha256(path) != recorded:
                return f"{path} is damaged (its SHA-256 differs from the one metrics.json recorded)"
        try:
            weights.load_state(checkpoint, spec)
            weights.load_arrays(optimizer)
        except weights.CheckpointError as error:
            return str(error)
        return None


class _RunLock:
    """An exclusive flock on a run directory's lock file, released when this object is freed."""

    def __init__(self, path: Path):
        import fcntl

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a+")
        except OSError as error:
            raise TrainingError(
                f"cannot write to the run directory {path.parent}: {error.strerror or error}"
            ) from error
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise TrainingError(
                f"{path.parent} is in use by another run ({holder} holds {path}); wait for it "
                f"to finish or choose another --out"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}\n")
        self.file.flush()


_HELD_LOCKS: weakref.WeakValueDictionary[str, _RunLock] = weakref.WeakValueDictionary()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(
    backend,
    arch,
    recipe: Recipe,
    out_dir,
    data_dir=None,
    resume: bool = False,
    progress: bool = True,
    on_step=None,
    precision: str = "fp32",
    compile: bool = False,
    devices: int = 1,
    sync_bn: bool = False,
) -> dict:
    """Train `arch` with `recipe` in `backend`; returns the run record (also in metrics.json).

    `precision` (fp32, tf32, bf16) and `compile` choose the trainer's arithmetic and compiler
    (see BackendBase.make_trainer); the record says which arithmetic the run used.
    `devices` > 1 trains data-parallel (in a process made by conformance.engines.prepare),
    BatchNorm synchronised over the devices with `sync_bn`; the record says how.
    `on_step(epoch, step)` is called after every optimiser step (tests use it to interrupt).
    """
    spec = fashion_mnist_spec(arch)
    check_devices(recipe, devices, sync_bn)
    writer = engines.process_index() == 0  # torchrun: every rank trains, rank 0 writes
    progress = progress and writer
    run = Run(out_dir)
    record = _start_or_resume(run, backend, spec, recipe, resume, lock=writer)
    # Float32 as float32, whatever ran before in this process (JAX's 64-bit types stay on after
    # float64 work, and a float32 step's indices, labels and step counter would turn int64).
    with backend.dtype_scope("float32"):
        model = backend.build(spec)
        if devices > 1:
            trainer = engines.make_trainer(backend, model, recipe.lr, recipe.momentum, precision, devices, sync_bn)
        else:
            trainer = backend.make_trainer(model, recipe.lr, recipe.momentum, precision=precision, compile=compile)
        record.update(precision=precision, arithmetic=trainer.arithmetic, **engines.describe(trainer))
        done = len(record["epochs"])
        if done:
            backend.load_state(model, weights.load_state(run.checkpoint(done), spec))
            trainer.load_optimizer_state(weights.load_arrays(run.optimizer(done)))
        else:
            backend.load_state(model, weights.init_state(spec, recipe.seed))
        train_x, train_y, test_x, test_y = load_dataset(recipe, data_dir)
        trainer.set_data(train_x, train_y)

        for epoch in range(done + 1, recipe.epochs + 1):
            order = data.epoch_order(len(train_x), recipe.seed, epoch)
            starts = range(0, len(order), recipe.batch_size)  # the batches of data.batches(..., order)
            bar = _progress(len(starts), f"{backend.name} epoch {epoch}/{recipe.epochs}", progress)
            totals = EpochTotals(epoch, run)
            start = time.perf_counter()
            for step, first in enumerate(starts, start=1):
                trainer.step_on(order[first : first + recipe.batch_size])
                bar.update(1)
                if step % SYNC_EVERY == 0 or step == len(starts):
                    totals.add(trainer.read_sums())
                    bar.set_postfix(loss=f"{totals.loss:.3f}", acc=f"{totals.accuracy:.3f}", refresh=False)
                if on_step:
                    on_step(epoch, step)
            seconds = time.perf_counter() - start
            bar.close()
            test_acc = evaluate_accuracy(trainer, backend, test_x, test_y)
            record["epochs"].append(
                {
                    "epoch": epoch,
                    "loss": totals.loss,
                    "train_acc": totals.accuracy,
                    "test_acc": test_acc,
                    "examples_per_s": totals.seen / seconds,
                    "seconds": seconds,
                    "checkpoint": str(run.checkpoint(epoch).relative_to(run.dir)),
                    "batch_losses": totals.batch_losses,
                }
            )
            if writer:
                run.commit(record, backend, model, trainer, spec)
            if progress:
                e = record["epochs"][-1]
                print(
                    f"{backend.name} epoch {epoch}: loss {e['loss']:.4f}, train acc {e['train_acc']:.4f}, "
                    f"test acc {e['test_acc']:.4f}, {e['examples_per_s']:.0f} examples/s",
                    flush=True,
                )
    return record


# Steps between reads of the device's sums: each read waits for the device, so rarely.
SYNC_EVERY = 200


class EpochTotals:
    """One epoch's loss and accuracy, from the trainer's sums; stops at the first non-finite loss."""

    def __init__(self, epoch: int, run: Run):
        self.epoch, self.run = epoch, run
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0
        self.batch_losses: list[float] = []

    def add(self, sums) -> None:
        loss_sum, correct, seen, batch_losses = sums
        bad = next((i for i, loss in enumerate(batch_losses) if not math.isfinite(loss)), None)
        if bad is not None:
            self.diverged(len(self.batch_losses) + bad + 1, batch_losses[bad])
        self.loss_sum, self.correct, self.seen = self.loss_sum + loss_sum, self.correct + correct, self.seen + seen
        self.batch_losses += batch_losses

    def diverged(self, step: int, loss: float):
        kept = (
            f"the last good checkpoint, epoch {self.epoch - 1}, is intact in {self.run.dir}: "
            f"resume from it with --resume"
            if self.epoch > 1
            else "no epoch was completed"
        )
        raise TrainingError(
            f"training diverged: the loss is {loss} at epoch {self.epoch}, step {step}; "
            f"{kept}, or start again with a lower --lr"
        )

    @property
    def loss(self) -> float:
        return self.loss_sum / self.seen

    @property
    def accuracy(self) -> float:
        return self.correct / self.seen


def branch(source, out_dir, epoch: int) -> None:
    """Start the run directory `out_dir` from `source`'s first `epoch` epochs (their record,
    checkpoint and optimiser files), to be continued differently with resume: on more devices,
    say. The record names the run and epoch it branched from."""
    import shutil

    source, run = Run(source), Run(out_dir)
    record = source.read()
    if record is None or len(record["epochs"]) < epoch:
        raise TrainingError(
            f"cannot branch from epoch {epoch} of {source.dir}: it holds "
            f"{len(record['epochs']) if record else 'no'} completed epoch(s)"
        )
    if run.dir.exists():
        raise TrainingError(f"{run.dir} already exists; branch into a new directory")
    run.checkpoint(epoch).parent.mkdir(parents=True)
    for path in source.epoch_files(epoch):
        shutil.copy2(path, run.dir / path.relative_to(source.dir))
    record.update(epochs=record["epochs"][:epoch], branched_from={"run": str(source.dir), "epoch": epoch})
    atomic_write_text(run.metrics_path, json.dumps(record, indent=2))


def check_devices(recipe: Recipe, devices: int, sync_bn: bool) -> None:
    if sync_bn and devices < 2:
        raise ValueError("synchronised BatchNorm (--sync-bn) needs --devices 2 or more")
    if recipe.batch_size % devices:
        raise ValueError(
            f"the batch size {recipe.batch_size} does not split evenly over {devices} devices; "
            f"use a batch size divisible by {devices}"
        )


def _start_or_resume(run: Run, backend, spec, recipe: Recipe, resume: bool, lock: bool = True) -> dict:
    if lock:
        run.lock()
    record = run.read()
    fresh = {
        "backend": backend.name,
        "device": backend.device_name,
        "device_note": backend.device_note,
        "spec": json.loads(spec.to_json()),
        "recipe": dataclasses.asdict(recipe),
        "epochs": [],
    }
    if record is None:
        return fresh
    if not resume:
        raise TrainingError(
            f"{run.dir} already holds a run ({len(record['epochs'])} epoch(s)); "
            f"pass --resume to continue it or choose another --out"
        )
    if record["spec"] != fresh["spec"] or {**record["recipe"], "epochs": 0} != {**fresh["recipe"], "epochs": 0}:
        raise TrainingError(f"{run.dir} holds a run of another architecture or recipe; cannot resume it with this one")
    record["recipe"]["epochs"] = recipe.epochs
    return _last_intact(run, record, spec)


def _last_intact(run: Run, record: dict, spec) -> dict:
    """The record cut back to its last epoch whose files are intact, with a notice for each
    damaged one; a clear error if none is."""
    problems = []
    while record["epochs"]:
        problem = run.damage(record["epochs"][-1], spec)
        if problem is None:
            break
        problems.append(problem)
        record["epochs"].pop()
    if problems and not record["epochs"]:
        raise TrainingError(
            f"cannot resume {run.dir}: no completed epoch has intact files ({'; '.join(problems)}); "
            f"move the run directory aside and start again"
        )
    for problem in problems:
        print(f"note: {problem}; resuming from epoch {len(record['epochs'])}", file=sys.stderr)
    return record


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="batch", disable=not enabled, leave=False, mininterval=0.5)


def evaluate_checkpoint(
    backend, checkpoint, size: int | None = None, data_dir=None, batch_size: int = 256, test_examples: int | None = None
) -> dict:
    """Test accuracy of a canonical checkpoint in `backend` (any backend can read any one)."""
    spec = weights.spec_of_checkpoint(checkpoint)
    metadata = weights.read_metadata(checkpoint)
    if size is None:
        size = json.loads(metadata["recipe"])["size"] if "recipe" in metadata else None
    if size is None:
        raise ValueError(f"{checkpoint} records no input size; pass --size")
    recipe = Recipe(
        "evaluate", size=size, batch_size=batch_size, lr=0.0, momentum=0.0, epochs=0, test_examples=test_examples
    )
    model = backend.build(spec)
    backend.load_state(model, weights.load_state(checkpoint, spec))
    trainer = backend.make_trainer(model, 0.0)
    _, _, test_x, test_y = load_dataset(recipe.replace(train_examples=1), data_dir)
    return {
        "backend": backend.name,
        "device": backend.device_name,
        "checkpoint": str(checkpoint),
        "arch": spec.name,
        "size": size,
        "examples": len(test_y),
        "test_acc": evaluate_accuracy(trainer, backend, test_x, test_y, batch_size),
    }


def seed_spread(backend, arch, recipe: Recipe, seeds: int, out_dir, data_dir=None, progress: bool = False) -> dict:
    """Train `recipe` with seeds 0..seeds-1 and summarise how much the final test accuracy and
    training loss scatter: the yardstick for the accuracy-conformance tolerances.

    Each seed's run is a run directory `out_dir/seed-N`, resumed where it stopped: a command
    interrupted and run again trains only what is missing."""
    from tqdm.auto import tqdm

    runs = []
    for seed in tqdm(range(seeds), desc=f"{backend.name} seeds", unit="seed", disable=not progress):
        record = train(
            backend,
            arch,
            recipe.replace(seed=seed),
            Path(out_dir) / f"seed-{seed}",
            data_dir,
            resume=True,
            progress=False,
        )
        last = record["epochs"][-1]
        runs.append({"seed": seed, "test_acc": last["test_acc"], "loss": last["loss"]})
    summary = {
        "backend": backend.name,
        "device": backend.device_name,
        "recipe": dataclasses.asdict(recipe),
        "runs": runs,
    }
    for field in ("test_acc", "loss"):
        values = np.array([run[field] for run in runs])
        summary[field] = {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if seeds > 1 else 0.0,
            "min": float(values.min()),
            "max": float(values.max()),
        }
    atomic_write_text(Path(out_dir) / "seed-spread.json", json.dumps(summary, indent=2))
    return summary
