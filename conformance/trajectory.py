"""Trajectories: the same training, step by step, in every backend.

Every backend trains through its own trainer (`Trainer.step_on`, the loop `densenet-xf train`
runs) from the canonical initial weights, on the same batches in the same order, and exports
its canonical weights every `every` steps. The trajectories are compared across backends and
with the NumPy reference (conformance/reference.py), which follows the same steps over as many
of them as `reference_steps` asks: a d2l-net step at 32x32 and batch 64 took it 1.2-1.7 s on
one core of a lightly loaded 2-core VM (94 steps in 2.6 minutes), 12.6 s when the machine was
loaded eight times over.

Compared: the trainable weights, as the worst tensor's largest difference over its largest
magnitude. The running BatchNorm statistics are not: train-mode steps do not read them, and
PyTorch folds the unbiased batch variance into them where the others fold the biased one
(docs/differences.md); they change only the test predictions, which are compared as classes.

Hyperparameters that float32 holds exactly: MXNet's kernels take the learning rate, the
momentum and the 1/batch gradient rescale as float32 even in a float64 model, so the setups use
a learning rate of 0.125, a momentum of 0.875 and power-of-two batches that divide the data
(the quick recipe's 6,000 images rounded up to 94 batches of 64). Then every backend takes the
same float64 step, and a difference is the frameworks' own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import data, reference, training, weights
from .files import write_json
from .specs import is_running_stat, to_layout


@dataclass(frozen=True)
class Setup:
    name: str
    arch: str
    size: int
    batch_size: int
    steps: int
    lr: float
    momentum: float  # of the runs with momentum; every setup also runs without
    every: int  # canonical weights exported every `every` steps
    train_examples: int
    test_examples: int
    reference_steps: int  # the prefix the NumPy reference follows
    seed: int = 0


SETUPS = {
    # One full epoch of the quick recipe's data (94 steps), the d2l net at 32x32, its 2,000 test
    # images: `densenet-xf trajectory` (minutes per run and backend on two CPU cores).
    "quick": Setup("quick", "d2l", 32, 64, 94, 0.125, 0.875, 2, 94 * 64, 2000, reference_steps=94),
    # `make conformance`'s: the tiny_d2l net at 16x16, seconds per backend, the reference all the way.
    "conformance": Setup("conformance", "tiny_d2l", 16, 32, 24, 0.125, 0.875, 4, 24 * 32, 500, reference_steps=24),
}
DTYPES = ("float64", "float32")
CONFORMANCE = "conformance"  # the setup `make conformance` trains (float64 only)


def get_setup(name: str) -> Setup:
    try:
        return SETUPS[name]
    except KeyError:
        raise ValueError(f"unknown trajectory setup {name!r}; valid names: {', '.join(SETUPS)}") from None


def spec_of(setup: Setup):
    return training.fashion_mnist_spec(setup.arch).replace(drop_rate=0.0)  # dropout: a random stream per framework


def run_name(dtype: str, momentum: float) -> str:
    return f"{dtype}-momentum-{momentum:g}"


def runs(setup: Setup, dtypes=DTYPES, only=None) -> list[tuple[str, float]]:
    """(dtype, momentum) of every run of `setup`, or of those named in `only` (run_name)."""
    every = [(dtype, momentum) for dtype in dtypes for momentum in (0.0, setup.momentum)]
    if only is not None:
        unknown = set(only) - {run_name(*run) for run in every}
        if unknown:
            valid = ", ".join(run_name(*run) for run in every)
            raise ValueError(f"unknown trajectory run(s) {', '.join(sorted(unknown))}; valid names: {valid}")
    return [run for run in every if only is None or run_name(*run) in only]


def snapshot_steps(setup: Setup, steps: int | None = None) -> list[int]:
    steps = setup.steps if steps is None else steps
    return sorted({*range(0, steps + 1, setup.every), steps})


def load_data(setup: Setup, data_dir=None):
    recipe = training.Recipe(
        setup.name,
        setup.size,
        setup.batch_size,
        setup.lr,
        0.0,
        1,
        train_examples=setup.train_examples,
        test_examples=setup.test_examples,
    )
    return training.load_dataset(recipe, data_dir)


def batch_indices(setup: Setup, step: int, examples: int) -> np.ndarray:
    """The examples of step `step` (1-based): the quick recipe's order, epoch after epoch."""
    per_epoch = examples // setup.batch_size
    epoch, within = divmod(step - 1, per_epoch)
    order = data.epoch_order(examples, setup.seed, epoch + 1)
    return order[within * setup.batch_size : (within + 1) * setup.batch_size]


def backend_run(backend, setup: Setup, dtype: str, momentum: float, data_dir=None, progress: bool = False) -> dict:
    """One backend's trajectory: {"weights": {step: canonical state}, "predictions": test classes}."""
    from tqdm.auto import tqdm

    spec = spec_of(setup)
    model = backend.build(spec, dtype)
    backend.load_state(model, weights.init_state(spec, setup.seed))
    trainer = backend.make_trainer(model, setup.lr, momentum)
    train_x, train_y, test_x, _ = load_data(setup, data_dir)
    trainer.set_data(train_x, train_y)
    keep = set(snapshot_steps(setup))
    snapshots = {0: backend.export_state(model)}
    label = f"{backend.name} {run_name(dtype, momentum)}"
    for step in tqdm(range(1, setup.steps + 1), desc=label, unit="step", disable=not progress, leave=False):
        trainer.step_on(batch_indices(setup, step, len(train_x)))
        if step in keep:
            snapshots[step] = backend.export_state(model)
    predictions = []
    for x, _ in data.batches(test_x, np.zeros(len(test_x), np.int64), training.EVAL_BATCH):
        predictions.append(trainer.predict(to_layout(x, backend.layout).astype(dtype)).argmax(axis=1))
    return {"weights": snapshots, "predictions": np.concatenate(predictions)}


def save_run(path: Path, result: dict, metadata: dict) -> None:
    arrays = {f"{step}/{key}": value for step, state in result["weights"].items() for key, value in state.items()}
    arrays["predictions"] = np.asarray(result["predictions"], np.int64)
    weights.save_arrays(path, arrays, {k: str(v) for k, v in metadata.items()})


def load_run(path: Path) -> dict:
    arrays = weights.load_arrays(path)
    snapshots: dict[int, dict] = {}
    for name, value in arrays.items():
        if name != "predictions":
            step, key = name.split("/", 1)
            snapshots.setdefault(int(step), {})[key] = value
    return {"weights": snapshots, "predictions": arrays["predictions"]}


def run_path(out_dir, backend: str, dtype: str, momentum: float) -> Path:
    return Path(out_dir) / backend / f"{run_name(dtype, momentum)}.safetensors"


def backend_runs(
    backend, setup: Setup, out_dir, dtypes=DTYPES, data_dir=None, progress=False, only=None, resume=False
) -> list[Path]:
    """Every run of `setup` in `backend` (or those named in `only`), each saved as a safetensors
    file under out_dir/BACKEND; with `resume`, a run whose file is there is not trained again."""
    paths = []
    for dtype, momentum in runs(setup, dtypes, only):
        path = run_path(out_dir, backend.name, dtype, momentum)
        paths.append(path)
        if resume and path.is_file():
            continue
        result = backend_run(backend, setup, dtype, momentum, data_dir, progress)
        save_run(path, result, {"backend": backend.name, "setup": setup.name, "dtype": dtype, "momentum": momentum})
    return paths


# ---------------------------------------------------------------------------------------
# The NumPy reference


def reference_run(setup: Setup, momentum: float, steps: int, data_dir=None, progress: bool = False) -> dict:
    """The reference's float64 trajectory over the first `steps` steps: plain SGD with
    PyTorch's momentum convention (buffer = momentum * buffer + gradient, w -= lr * buffer)."""
    from tqdm.auto import tqdm

    spec = spec_of(setup)
    state = {key: value.astype(np.float64) for key, value in weights.init_state(spec, setup.seed).items()}
    train_x, train_y, _, _ = load_data(setup, data_dir)
    buffers: dict[str, np.ndarray] = {}
    keep = set(snapshot_steps(setup, steps))
    snapshots = {0: dict(state)}
    label = f"reference {run_name('float64', momentum)}"
    for step in tqdm(range(1, steps + 1), desc=label, unit="step", disable=not progress, leave=False):
        index = batch_indices(setup, step, len(train_x))
        x, y = train_x[index][:, None] / 255.0, train_y[index].astype(np.int64)  # float64, as the trainers' step_on
        grads = reference.loss_and_gradients(spec, state, x, y).grads
        for key, grad in grads.items():
            buffers[key] = momentum * buffers[key] + grad if key in buffers and momentum else grad
            state[key] = state[key] - setup.lr * buffers[key]
        if step in keep:
            snapshots[step] = dict(state)
    return {"weights": snapshots}


# ---------------------------------------------------------------------------------------
# Comparison


def difference(state, other) -> float:
    """The worst trainable tensor's largest difference over its largest magnitude in `other`,
    that magnitude taken no smaller than a thousandth of the largest weight: a convolution bias
    before a train-mode BatchNorm has a zero gradient in exact arithmetic, so it holds only
    rounding noise, which no two implementations share (docs/numerics.md, the error measure)."""
    trainable = [key for key in other if not is_running_stat(key)]
    floor = 1e-3 * max((float(np.max(np.abs(other[key]))) for key in trainable), default=0.0)
    worst = 0.0
    for key in trainable:
        scale = max(float(np.max(np.abs(other[key]))), floor) or 1.0
        worst = max(worst, float(np.max(np.abs(np.asarray(state[key], np.float64) - other[key]))) / scale)
    return worst


def compare(trajectories: dict, reference_weights: dict | None = None) -> dict:
    """Per backend and step: the largest difference to any other backend, and to the reference
    where it has the step. `trajectories`: {backend: run}; `reference_weights`: {step: state}."""
    names = list(trajectories)
    steps = sorted(set.intersection(*(set(t["weights"]) for t in trajectories.values())))
    out = {}
    for name in names:
        own = trajectories[name]["weights"]
        others = [n for n in names if n != name]
        out[name] = {
            "steps": steps,
            "to_others": [
                max((difference(own[s], trajectories[o]["weights"][s]) for o in others), default=0.0) for s in steps
            ],
            "to_reference": {
                s: difference(own[s], reference_weights[s])
                for s in steps
                if reference_weights and s in reference_weights
            },
        }
    predictions = np.stack([np.asarray(trajectories[n]["predictions"]) for n in names])
    differing = (predictions != predictions[:1]).any(axis=0)
    majority = np.array([np.bincount(column).argmax() for column in predictions.T], dtype=predictions.dtype)
    return {
        "backends": out,
        "test_images": int(predictions.shape[1]),
        "predictions_differing": int(differing.sum()),
        "predictions_differing_by_backend": {n: int((predictions[i] != majority).sum()) for i, n in enumerate(names)},
    }


def reference_weights(setup: Setup, out_dir, momentum: float, steps: int, data_dir=None, progress=False):
    """The reference's trajectory {step: state} over `steps` steps, from out_dir/reference or computed
    and kept there (None for no steps)."""
    if not steps:
        return None
    cache = Path(out_dir) / "reference" / f"{run_name('float64', momentum)}-{steps}.safetensors"
    if cache.is_file():
        return load_run(cache)["weights"]
    snapshots = reference_run(setup, momentum, steps, data_dir, progress)["weights"]
    save_run(cache, {"weights": snapshots, "predictions": np.zeros(0)}, {"setup": setup.name})
    return snapshots


def reference_runs(setup: Setup, out_dir, data_dir=None) -> None:
    """The reference's float64 trajectories of `setup`, kept in out_dir/reference for `summarise`."""
    for momentum in (0.0, setup.momentum):
        reference_weights(setup, out_dir, momentum, setup.reference_steps, data_dir)


def summarise(setup: Setup, out_dir, names, dtypes=DTYPES, reference_steps=None, data_dir=None, progress=False):
    """Every run of every backend in out_dir compared: {run name: comparison}, written to trajectory.json."""
    reference_steps = setup.reference_steps if reference_steps is None else reference_steps
    result = {"setup": dataclasses.asdict(setup), "reference_steps": reference_steps, "runs": {}}
    for dtype, momentum in runs(setup, dtypes):
        trajectories = {
            n: load_run(run_path(out_dir, n, dtype, momentum))
            for n in names
            if run_path(out_dir, n, dtype, momentum).is_file()
        }
        if not trajectories:
            continue
        ref = (
            reference_weights(setup, out_dir, momentum, reference_steps, data_dir, progress)
            if dtype == "float64"
            else None
        )
        result["runs"][run_name(dtype, momentum)] = {
            "dtype": dtype,
            "momentum": momentum,
            **compare(trajectories, ref),
        }
    write_json(Path(out_dir) / "trajectory.json", result)
    return result


def worst(comparison: dict, name: str, to: str = "to_others") -> float:
    values = comparison["backends"][name][to]
    values = list(values.values()) if isinstance(values, dict) else values
    return max(values, default=0.0)


# ---------------------------------------------------------------------------------------
# The command: every backend in its own process, then the comparison, a table and a plot


def run(
    backends,
    setup_name="quick",
    out_dir="build/trajectory",
    reference_steps=None,
    data_dir=None,
    publish=None,
    only=None,
):
    """Every backend's runs in a process of its own (runs already in out_dir are kept), then the
    comparison: trajectory.json, .md and .png in out_dir."""
    from .reporting import publish_files, write_files

    setup = get_setup(setup_name)
    chosen = runs(setup, only=only)
    out_dir = Path(out_dir)
    done = []
    for name in backends:
        print(f"trajectory: {name}, setup {setup.name}: {len(chosen)} runs of {setup.steps} steps", flush=True)
        command = [sys.executable, "-m", "conformance.trajectory", "--backend", name, "--setup", setup.name]
        command += ["--out", str(out_dir), "--runs", ",".join(run_name(*r) for r in chosen)]
        command += ["--data-dir", str(data_dir)] if data_dir else []
        if subprocess.run(command).returncode == 0:
            done.append(name)
        else:
            print(f"trajectory: {name} failed or is not available; left out", flush=True)
    print(f"trajectory: the NumPy reference over {reference_steps or setup.reference_steps} steps ...", flush=True)
    result = summarise(setup, out_dir, done, reference_steps=reference_steps, data_dir=data_dir, progress=True)
    from .reporting import run_record

    result.update(run_record())
    write_files(out_dir, result, "trajectory.json", "trajectory.md", markdown, {"trajectory.png": plot})
    if publish:
        publish_files(out_dir, Path(publish), ("trajectory.md", "trajectory.json", "trajectory.png"))
    return result


def markdown(result: dict) -> str:
    setup = result["setup"]
    out = [
        "# Training trajectories across backends",
        "",
        f"- date: {result.get('date', '-')}",
        f"- setup `{setup['name']}`: {setup['arch']} net at {setup['size']}x{setup['size']}, batch "
        f"{setup['batch_size']}, {setup['steps']} steps of SGD at lr {setup['lr']} (without momentum and with "
        f"{setup['momentum']}), weights exported every {setup['every']} steps; "
        f"{setup['train_examples']} training images, {setup['test_examples']} test images",
        f"- the NumPy reference follows the first {result['reference_steps']} steps (float64)",
        "- made by: `densenet-xf trajectory` (conformance/trajectory.py)",
        "",
        "Largest relative difference of the trainable weights over the run (worst tensor: largest "
        "difference over largest magnitude), to any other backend and to the reference; test images whose "
        "predicted class differs in any backend.",
        "",
        "| run | backend | to other backends | to the reference | final step, to others |",
        "|---|---|---|---|---|",
    ]
    for run_label, comparison in result["runs"].items():
        for name, b in comparison["backends"].items():
            to_ref = f"{worst(comparison, name, 'to_reference'):.1e}" if b["to_reference"] else "-"
            out.append(
                f"| {run_label} | {name} | {worst(comparison, name):.1e} | {to_ref} | {b['to_others'][-1]:.1e} |"
            )
    out += ["", "| run | test images | predicted class differs in some backend |", "|---|---|---|"]
    for run_label, comparison in result["runs"].items():
        out.append(f"| {run_label} | {comparison['test_images']} | {comparison['predictions_differing']} |")
    out += ["", "![relative weight difference against the step](trajectory.png)"]
    return "\n".join(out) + "\n"


def plot(result: dict, path) -> None:
    """A panel per momentum and dtype: each backend's largest difference to the others, log scale."""
    from .reporting import pyplot, save_png

    plt = pyplot()
    labels = list(result["runs"])
    momenta = sorted({result["runs"][r]["momentum"] for r in labels})
    dtypes = [d for d in DTYPES if any(result["runs"][r]["dtype"] == d for r in labels)]
    figure, axes = plt.subplots(
        len(momenta),
        len(dtypes),
        figsize=(5.5 * len(dtypes), 3.6 * len(momenta)),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    for run_label in labels:
        comparison = result["runs"][run_label]
        axis = axes[momenta.index(comparison["momentum"])][dtypes.index(comparison["dtype"])]
        for name, b in comparison["backends"].items():  # from the first step: step 0 is the same weights
            steps, values = zip(*[(s, v) for s, v in zip(b["steps"], b["to_others"]) if int(s) > 0])
            (line,) = axis.plot(steps, np.maximum(values, 1e-17), label=name)
            reference = sorted((int(s), v) for s, v in b["to_reference"].items() if int(s) > 0)
            if reference:
                steps, values = zip(*reference)
                axis.plot(steps, np.maximum(values, 1e-17), linestyle="--", color=line.get_color())
        axis.set_yscale("log")
        axis.set_title(f"{comparison['dtype']}, momentum {comparison['momentum']:g}")
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("relative weight difference")
    axes[0][0].legend(fontsize=8, title="solid: to other backends\ndashed: to the reference", title_fontsize=7)
    figure.suptitle(f"Same weights, same batches: setup {result['setup']['name']}")
    save_png(figure, path)


def main(argv=None) -> int:
    """One backend's runs, in a process of its own (the `trajectory` command starts one per backend)."""
    from .backends import load_backend

    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True)
    parser.add_argument("--setup", default="quick")
    parser.add_argument("--out", required=True)
    parser.add_argument("--data-dir")
    parser.add_argument("--runs", help="comma-separated run names (default: all)")
    args = parser.parse_args(argv)
    backend = load_backend(args.backend)
    only = args.runs.split(",") if args.runs else None
    backend_runs(
        backend, get_setup(args.setup), args.out, data_dir=args.data_dir, progress=True, only=only, resume=True
    )
    print(json.dumps({"backend": backend.name, "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
