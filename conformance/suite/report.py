"""Merge the backends' measurements into report.json, report.md and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from .. import specs, training, trajectory
from ..reporting import matrix_table, publish_files, pyplot, run_record, save_png, versions_line, write_files
from . import checks, onnx

# Float64 training trajectories (conformance/trajectory.py, setup "conformance": tiny_d2l at 16x16,
# 24 steps of batch 32, without and with momentum), each backend's trainable weights against the
# NumPy reference's at every 4th step. Measured 2026-12-06 (2-core x86 VM): at most 1.3e-14 in
# every backend (60 float64 epsilons after 24 steps). The d2l net's 94 steps of `densenet-xf
# trajectory --setup quick` (docs/results/trajectory.md) stay within 1.7e-13 of each other and
# of the reference without momentum, and grow to 4.7e-13 with momentum 0.875. The tolerance sits
# a factor 1,000 above this setup's measurement (20 above the longer run's), for other BLAS
# builds and thread counts, and three orders below the smallest defects it must catch: a
# learning rate of 0.1 passed as float32 moves each step by 1.5e-8 of itself, and images cast
# to float32 before a float64 step put the weights 4.5e-8 from the reference (measured).
TRAJECTORY_TOLERANCE = 1e-11
PLOTS = ("errors.png", "cross_backend.png", "learning_curves.png")


def load_results(out_dir: Path, backends) -> dict:
    results = {}
    for name in backends:
        path = Path(out_dir) / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.is_file() else {"status": "error", "reason": "no result"}
    return results


def _key(row) -> str:
    return " ".join(part for part in (row["config"], row.get("dtype", ""), row["check"]) if part)


def build(
    out_dir, backends, configs, device, recipe_name, sensitivity, require_all, seconds, jobs=1, memory_efficient=()
) -> dict:
    results = load_results(out_dir, backends)
    failures = []
    status = {}
    for name, data in results.items():
        status[name] = {
            k: data.get(k)
            for k in (
                "status",
                "reason",
                "device",
                "device_note",
                "layout",
                "running_var",
                "float32_hyperparameters",
                "data_parallel",
            )
        }
        status[name]["seconds"] = (data.get("seconds_checks") or 0) + (data.get("seconds_cross") or 0)
        if data.get("status") == "error":
            failures.append(f"{name}: {data.get('phase', '')} failed: {data.get('reason')}")
        elif data.get("status") == "skipped" and require_all:
            failures.append(f"{name}: skipped ({data.get('reason')}), but every backend is required")

    rows = {}
    for name, data in results.items():
        for row in data.get("rows", []):
            if row["check"] == "seconds":
                continue
            entry = rows.setdefault(
                _key(row),
                {
                    "config": row["config"],
                    "dtype": row.get("dtype"),
                    "check": row["check"],
                    "tolerance": row.get("tolerance"),
                    "results": {},
                },
            )
            if entry["tolerance"] is None and row.get("tolerance") is not None:  # the first backend skipped it
                entry["tolerance"] = row["tolerance"]
            if row.get("derivation"):
                entry["derivation"] = row["derivation"]
            entry["results"][name] = {
                k: row[k]
                for k in (
                    "error",
                    "value",
                    "passed",
                    "worst_key",
                    "convention",
                    "error_under_other_convention",
                    "skipped",
                )
                if k in row
            }
            if not row["passed"]:
                detail = (
                    f"error {row['error']:.3g} > tolerance {row['tolerance']:.3g}"
                    + (f" (worst: {row['worst_key']})" if row.get("worst_key") else "")
                    if "error" in row
                    else f"got {row.get('value')}, expected {row.get('expected')}"
                )
                failures.append(f"{name}: {_key(row)}: {detail}")
    trajectories = _trajectory_rows(out_dir, results, rows, failures)
    for entry in rows.values():  # the same tensor in NCHW and NHWC backends
        if entry["check"] == "stage shapes":
            as_nchw = {
                name: {
                    stage: list(specs.shape_to_nchw(shape, results[name]["layout"]))
                    for stage, shape in r["value"].items()
                }
                for name, r in entry["results"].items()
            }
            entry["same_tensor_across_layouts"] = len({json.dumps(v, sort_keys=True) for v in as_nchw.values()}) <= 1
            if not entry["same_tensor_across_layouts"]:
                failures.append(f"{entry['config']}: NCHW and NHWC stage shapes are not the same tensors transposed")

    cross = {name: data["cross"] for name, data in results.items() if "cross" in data}
    # A zoo model's logits against a backend's on the converted file: two float32 implementations
    # on the same weights, held to the cross-backend tolerance (derived on the d2l net).
    cross_tolerance, cross_words = checks.cross_tolerance()
    for loader, errors in cross.items():
        for source, error in errors.items():
            if error > cross_tolerance:
                failures.append(
                    f"{loader}: logits on weights exported by {source}: error {error:.3g} > {cross_tolerance:.3g}"
                )

    zoo_errors = {name: data["zoo"] for name, data in results.items() if data.get("zoo")}
    zoo_tolerance = cross_tolerance
    for loader, errors in zoo_errors.items():
        for fmt, error in errors.items():
            if error > zoo_tolerance:
                failures.append(
                    f"{loader}: logits on the converted {fmt} zoo file: error {error:.3g} > {zoo_tolerance:.3g}"
                )

    train = _training_summary(results, recipe_name, failures)
    onnx_section = onnx.section(results)
    failures += onnx_section["failures"] if onnx_section else []
    return {
        **run_record(),
        "device": device,
        "matrix": [list(c) for c in configs],
        "memory_efficient": [list(c) for c in memory_efficient],
        "seconds": seconds,
        "jobs": jobs,
        "backends": status,
        "rows": list(rows.values()),
        "cross": {"tolerance": cross_tolerance, "derivation": cross_words, "errors": cross},
        "zoo": {"tolerance": zoo_tolerance, "errors": zoo_errors},
        "float32_gradient_sensitivity": sensitivity,
        "training": train,
        "trajectory": trajectories,
        "onnx": onnx_section,
        "failures": failures,
        "passed": not failures,
    }


def _trajectory_rows(out_dir, results, rows, failures) -> dict | None:
    """A row per backend: its float64 trajectory's largest difference to the reference's, over
    both runs (without and with momentum); and the comparison itself, for the report."""
    names = [name for name, data in results.items() if data.get("trajectory")]
    if not names:
        return None
    setup = trajectory.get_setup(trajectory.CONFORMANCE)
    summary = trajectory.summarise(setup, Path(out_dir) / "trajectory", names, dtypes=("float64",))
    key = f"{setup.arch}@{setup.size} float64 trajectory, {setup.steps} steps"
    entry = rows.setdefault(
        key,
        {
            "config": f"{setup.arch}@{setup.size}",
            "dtype": "float64",
            "check": f"trajectory, {setup.steps} steps",
            "tolerance": TRAJECTORY_TOLERANCE,
            "results": {},
        },
    )
    for name in names:
        error = max(trajectory.worst(run, name, "to_reference") for run in summary["runs"].values())
        entry["results"][name] = {"error": error, "passed": error <= TRAJECTORY_TOLERANCE}
        if error > TRAJECTORY_TOLERANCE:
            failures.append(f"{name}: {key}: error {error:.3g} > tolerance {TRAJECTORY_TOLERANCE:.3g}")
    return summary


def _spread(values) -> float:
    return max(values) - min(values) if values else 0.0


def _training_summary(results, recipe_name, failures) -> dict | None:
    """Final accuracies per backend; thresholds and spreads per recipe (a backend that fell
    back to the CPU in a GPU run trains the quick recipe instead)."""
    if not recipe_name:
        return None
    runs = {name: data["training"] for name, data in results.items() if data.get("training")}
    final = {}
    for name, record in runs.items():
        last = record["epochs"][-1]
        final[name] = {k: last[k] for k in ("test_acc", "train_acc", "loss", "examples_per_s")}
        final[name].update(
            device=record["device"],
            seconds=sum(e["seconds"] for e in record["epochs"]),
            recipe=record["recipe"]["name"],
        )
    groups = {}
    for name, f in final.items():
        groups.setdefault(f["recipe"], []).append(name)
    recipes = {}
    for group, names in groups.items():
        recipe = training.get_recipe(group)
        spread = _spread([final[n]["test_acc"] for n in names])
        loss_spread = _spread([final[n]["loss"] for n in names])
        recipes[group] = {
            "backends": names,
            "min_test_acc": recipe.min_test_acc,
            "max_spread": recipe.max_spread,
            "max_loss_spread": recipe.max_loss_spread,
            "spread": spread,
            "loss_spread": loss_spread,
        }
        for n in names:
            if final[n]["test_acc"] < recipe.min_test_acc:
                failures.append(
                    f"{n}: training ({group}): test accuracy {final[n]['test_acc']:.4f} < {recipe.min_test_acc}"
                )
        if spread > recipe.max_spread:
            failures.append(
                f"training ({group}): test accuracies of {', '.join(names)} differ by {spread:.4f} "
                f"> {recipe.max_spread}"
            )
        if recipe.max_loss_spread is not None and loss_spread > recipe.max_loss_spread:
            failures.append(
                f"training ({group}): final training losses of {', '.join(names)} differ by "
                f"{loss_spread:.4f} > {recipe.max_loss_spread}"
            )
    return {
        "recipe": recipe_name,
        "recipes": recipes,
        "final": final,
        "curves": {
            name: {
                "test_acc": [e["test_acc"] for e in r["epochs"]],
                "batch_losses": [l for e in r["epochs"] for l in e.get("batch_losses", [])],
            }
            for name, r in runs.items()
        },
    }


# ---------------------------------------------------------------------------------------
# Markdown


def _cell(result: dict | None) -> str:
    if result is None:
        return "-"
    if result.get("skipped"):
        return f"skipped: {result['skipped']}"
    mark = "✓" if result["passed"] else "✗ FAIL"
    if "error" in result:
        return f"{result['error']:.1e} {mark}"
    value = result.get("value")
    if isinstance(value, list) and value and isinstance(value[0], int):
        return f"{value[0]:,} + {value[1]:,} {mark}"
    return mark


def _labels(matrix, keep) -> list[str]:
    """ARCH@SIZE of the matrix's checks.Config entries for which `keep(config)` holds."""
    return [f"{c.arch}@{c.size}" for c in (checks.Config(*entry) for entry in matrix) if keep(c)]


def _step_words(matrix) -> str:
    """Where the memory-efficient rows step the trainer, in words."""
    with_step = _labels(matrix, lambda c: c.trainer_step)
    return (
        f" (the trainer's step on {', '.join(with_step)})"
        if with_step
        else " but the trainer's step (make test steps it)"
    )


def _matrix_notes(matrix) -> str:
    """Which configs skip the trainer's SGD step, and which check only the eval pass in float32
    (checks.Config.trainer_step, float32_training)."""
    no_step = _labels(matrix, lambda c: not c.trainer_step)
    eval_only = _labels(matrix, lambda c: not c.float32_training)
    notes = ""
    if no_step:
        notes += (
            f" The trainer's step (sgd_update) is the same code on every net, and is not rebuilt for "
            f"{', '.join(no_step)}: there the running statistics are read after the gradients' train-mode pass."
        )
    if eval_only:
        notes += (
            f" {', '.join(eval_only)}: float32 checks the eval pass; the train-mode pass (the same code in "
            f"both dtypes) is checked in float64, to near machine precision."
        )
    return notes


def markdown(result: dict) -> str:
    sections = (
        header_section,
        backends_section,
        checks_section,
        running_variance_section,
        cross_section,
        zoo_section,
        lambda result: onnx.markdown(result.get("onnx")),
        conditioning_section,
        trajectory_section,
        training_section,
    )
    return "\n".join(line for section in sections for line in section(result)) + "\n"


def header_section(result: dict) -> list[str]:
    """The date, machine and versions, and the verdict with every failure."""
    out = [
        "# densenet-xf conformance report",
        "",
        f"- date: {result['date']}",
        f"- machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, {result['machine']['memory']}, "
        f"{result['machine']['os']}, Python {result['machine']['python']}",
        f"- requested device: {result['device']}",
        "- frameworks: " + versions_line(result["frameworks"]),
        f"- total time: {result['seconds']:.0f} s",
        "",
        f"## Verdict: {'PASSED' if result['passed'] else 'FAILED'}",
        "",
    ]
    out += [f"- {failure}" for failure in result["failures"]] or [
        "Every check of every backend is within its tolerance."
    ]
    return out


def backends_section(result: dict) -> list[str]:
    """Each backend's status, device, layout and time, with notes."""
    names = list(result["backends"])
    out = ["", "## Backends", "", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for field in ("status", "device", "layout", "running_var", "seconds"):
        values = [result["backends"][n].get(field) for n in names]
        values = [f"{v:.0f}" if isinstance(v, float) else str(v if v is not None else "-") for v in values]
        out.append(f"| {field.replace('_', ' ')} | " + " | ".join(values) + " |")
    notes = [
        f"- {n}: {b['reason'] or b['device_note']}"
        for n, b in result["backends"].items()
        if b.get("reason") or b.get("device_note")
    ]
    notes += [
        f"- {n}: its kernels take the learning rate and the BatchNorm momentum as float32 even in a float64 "
        f"model; its float64 SGD step is compared with the step those rounded values give"
        for n, b in result["backends"].items()
        if b.get("float32_hyperparameters")
    ]
    notes += [
        f"- {n}: data-parallel check skipped: {b['data_parallel'].get('reason')}"
        for n, b in result["backends"].items()
        if (b.get("data_parallel") or {}).get("status") == "skipped"
    ]
    out += [""] + notes if notes else []
    return out


def checks_section(result: dict) -> list[str]:
    """Every check of every backend against the NumPy reference."""
    names = list(result["backends"])
    out = [
        "",
        "## Checks against the NumPy float64 reference",
        "",
        "Relative errors (largest difference / largest reference magnitude; per tensor for gradients "
        "and updates, worst tensor shown). Parameter counts are trainable + non-trainable. The float32 "
        "gradient and update tolerances are derived per configuration from the reference's own "
        "conditioning (the table below; docs/numerics.md), written beside each. zero_gradients: the "
        "conv biases, whose gradient is exactly zero before a train-mode BatchNorm, as |gradient| / "
        "largest gradient; the gradient and update rows leave them out. Configs ending in `trainer`: "
        "one step of each trainer arithmetic mode (`--precision`), the mode in the dtype column."
        + (
            " Configs marked memory-efficient build the model with `memory_efficient=True` (its dense "
            "layers recompute their concatenation and first BN-ReLU in the backward pass; docs/memory.md): "
            f"the same checks and tolerances{_step_words(result['memory_efficient'])}, and running statistics "
            "that must move once per train-mode pass although BatchNorm runs twice."
            if result.get("memory_efficient")
            else ""
        )
        + _matrix_notes(result["matrix"]),
        "",
        "| check | tolerance | " + " | ".join(names) + " |",
        "|---" * (len(names) + 2) + "|",
    ]
    for row in result["rows"]:
        tolerance = f"{row['tolerance']:.0e}" if row.get("tolerance") is not None else "exact"
        if row.get("derivation"):
            tolerance = f"{row['tolerance']:.1e} = {row['derivation']}"
        elif row.get("tolerance") is None and any(r.get("skipped") for r in row["results"].values()):
            tolerance = "-"
        out.append(f"| {_key(row)} | {tolerance} | " + " | ".join(_cell(row["results"].get(n)) for n in names) + " |")

    return out


def running_variance_section(result: dict) -> list[str]:
    """Each backend's running-variance convention and its errors under both."""
    out = [
        "",
        "## BatchNorm running variance",
        "",
        "PyTorch folds the unbiased batch variance (n/(n-1) times the biased one) into its running variance; "
        "MXNet, Keras and Flax the biased one. Each backend is compared with the reference under its own "
        "convention; the last column shows what the error would be under the other one.",
        "",
        "| config | backend | convention | error | error under the other convention |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if row["check"] == "running_stats_update" and row["dtype"] == "float64":
            for n, r in row["results"].items():
                errors = f"{r['error']:.1e} | {r['error_under_other_convention']:.1e}"
                out.append(f"| {row['config']} | {n} | {r.get('convention')} | {errors} |")

    return out


def cross_section(result: dict) -> list[str]:
    """The matrix of weights exported by one backend and loaded into another."""
    cross = result["cross"]["errors"]
    out = []
    if cross:
        sources = list(next(iter(cross.values())))
        out += [
            "",
            "## Weights exported by one backend, loaded into another",
            "",
            f"Each backend takes one SGD step from shared weights and exports a canonical checkpoint; every "
            f"backend loads every export and computes eval-mode logits on the same batch. Relative error "
            f"against the exporting backend's own logits (tolerance {result['cross']['tolerance']:.1e} = "
            f"{result['cross'].get('derivation', '')}).",
            "",
        ] + matrix_table(
            "exported by \\ loaded into",
            sources,
            list(cross),
            lambda source, loader: f"{cross[loader].get(source, float('nan')):.1e}",
        )
        out += ["", "![cross-backend errors](cross_backend.png)"]

    return out


def zoo_section(result: dict) -> list[str]:
    """Each zoo's file converted and reproduced by every backend."""
    zoo_errors = result.get("zoo", {}).get("errors", {})
    out = []
    if zoo_errors:
        formats = sorted({fmt for errors in zoo_errors.values() for fmt in errors})
        out += [
            "",
            "## Model-zoo files converted and reproduced",
            "",
            f"A small model built by each zoo's own code (torchvision's modules, Keras applications' builder, "
            f"Gluon's model zoo) with random weights and BatchNorm statistics, saved in the zoo's format, "
            f"converted with `densenet-xf convert`; relative error of each backend's logits against the zoo "
            f"model's (tolerance {result['zoo']['tolerance']:.1e}, the cross-backend one: two float32 "
            f"implementations on the same weights). `docs/zoo.md` lists the differences handled.",
            "",
        ] + matrix_table(
            "zoo file \\ loaded into",
            formats,
            list(zoo_errors),
            lambda fmt, loader: f"{zoo_errors[loader].get(fmt, float('nan')):.1e}",
        )

    return out


def conditioning_section(result: dict) -> list[str]:
    """How far float32 rounding can move the reference's own gradients."""
    out = [
        "",
        "## Float32 conditioning of the reference",
        "",
        "How far the reference's own float64 gradients move when its input moves by one part in a million "
        "(conditioning), and how far its gradients and one SGD step's update move when the same arithmetic "
        "runs in float32 (reference in float32). Together they predict the error of a correct float32 "
        f"implementation; the float32 gradient and update tolerances are {checks.TOLERANCE_MULTIPLE} times the "
        "larger (conformance/suite/checks.py, float32_conditioning). Exact-zero gradients are left out.",
        "",
        "| config | conditioning | worst tensor | reference in float32: gradients | update "
        "| tolerance: gradients | update |",
        "|---|---|---|---|---|---|---|",
    ]
    for config, s in result["float32_gradient_sensitivity"].items():
        own, tolerance = s.get("float32_reference"), s.get("tolerance")
        extra = (
            f" {own['gradients']:.1e} | {own['sgd_update']:.1e} | {tolerance['gradients']:.1e} | "
            f"{tolerance['sgd_update']:.1e} |"
            if own and tolerance
            else " - | - | - | - |"
        )
        out.append(f"| {config} | {s['gradient_change']:.1e} | {s['worst_key']} |" + extra)
    out += ["", "![errors relative to tolerances](errors.png)"]

    return out


def trajectory_section(result: dict) -> list[str]:
    """The float64 trajectories: each backend's distance to the reference and the others, and
    the test predictions that differ."""
    summary = result.get("trajectory")
    if not summary:
        return []
    setup = summary["setup"]
    out = [
        "",
        "## Training trajectories in float64",
        "",
        f"Every backend's trainer takes {setup['steps']} SGD steps of the {setup['arch']} net at "
        f"{setup['size']}x{setup['size']} (batch {setup['batch_size']}, lr {setup['lr']}, without momentum and "
        f"with {setup['momentum']}) from the canonical initial weights on the same batches; its trainable weights "
        f"are compared every {setup['every']} steps with the NumPy reference's and the other backends' "
        f"(largest relative difference over the run; tolerance {TRAJECTORY_TOLERANCE:.0e}, derived in "
        "conformance/suite/report.py). `densenet-xf trajectory` runs the same for a full epoch of the quick "
        "recipe, in float32 too (docs/training_parity.md).",
        "",
        "| run | backend | to the reference | to the other backends | test predictions differing |",
        "|---|---|---|---|---|",
    ]
    for label, run in summary["runs"].items():
        for name in run["backends"]:
            out.append(
                f"| {label} | {name} | {trajectory.worst(run, name, 'to_reference'):.1e} | "
                f"{trajectory.worst(run, name):.1e} | {run['predictions_differing_by_backend'][name]} of "
                f"{run['test_images']} |"
            )
    return out + [
        "",
        "A test prediction differs when a backend's class is not the one most backends give; PyTorch's running "
        "variance is the unbiased one (the section above), which can move a prediction near a class boundary.",
    ]


def training_section(result: dict) -> list[str]:
    """The recipe's final accuracies, spreads and learning curves."""
    train = result.get("training")
    out = []
    if train:
        out += [
            "",
            f"## Training: recipe `{train['recipe']}`",
            "",
            "Same initial weights, same batches in the same order. Why these thresholds: the recipe's "
            "comment in conformance/training.py."
            + (
                f" The backends' workers ran {result.get('jobs')} at a time, so examples/s here is what each "
                f"got while sharing the machine: a record, not a benchmark (`make bench` is one)."
                if result.get("jobs", 1) > 1
                else ""
            ),
            "",
        ]
        for group, g in train["recipes"].items():
            loss_limit = "not checked" if g["max_loss_spread"] is None else f"at most {g['max_loss_spread']}"
            out.append(
                f"- recipe `{group}` ({', '.join(g['backends'])}): test accuracy at least {g['min_test_acc']}; "
                f"test accuracies within {g['max_spread']} (measured {g['spread']:.4f}); last-epoch "
                f"training losses {loss_limit} (measured {g['loss_spread']:.4f})"
            )
        out += [
            "",
            "| backend | recipe | device | test accuracy | train accuracy | train loss | examples/s | seconds |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n, f in train["final"].items():
            out.append(
                f"| {n} | {f['recipe']} | {f['device']} | {f['test_acc']:.4f} | {f['train_acc']:.4f} | "
                f"{f['loss']:.4f} | {f['examples_per_s']:.0f} | {f['seconds']:.0f} |"
            )
        out += ["", "![learning curves](learning_curves.png)"]
    return out


def summary_text(result: dict) -> str:
    names = list(result["backends"])
    width = max(len(_key(r)) for r in result["rows"]) if result["rows"] else 20
    lines = [f"{'check':<{width}}  " + "  ".join(f"{n:>14}" for n in names)]
    for field in ("status", "seconds"):
        lines.append(
            f"{field:<{width}}  "
            + "  ".join(
                f"{(f'{v:.0f}' if isinstance(v, float) else str(v)):>14}"
                for v in (result["backends"][n].get(field) for n in names)
            )
        )
    for row in result["rows"]:
        lines.append(f"{_key(row):<{width}}  " + "  ".join(f"{_cell(row['results'].get(n)):>14}" for n in names))
    if result.get("training"):
        for n, f in result["training"]["final"].items():
            lines.append(
                f"training {n}: test accuracy {f['test_acc']:.4f}, "
                f"{f['examples_per_s']:.0f} examples/s on {f['device']}"
            )
    for loader, errors in result.get("zoo", {}).get("errors", {}).items():
        lines.append(f"zoo files in {loader}: " + ", ".join(f"{fmt} {error:.1e}" for fmt, error in errors.items()))
    lines.append(f"VERDICT: {'PASSED' if result['passed'] else 'FAILED'}")
    lines += [f"  - {failure}" for failure in result["failures"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Files and plots


def write(out_dir, result: dict) -> None:
    plots = dict(zip(PLOTS, (plot_errors, plot_cross, plot_training)))
    write_files(out_dir, result, "report.json", "report.md", markdown, plots)


def plot_errors(result, path) -> None:
    """Every measured error divided by its tolerance, per backend: below 1 passes."""
    plt = pyplot()
    rows = [r for r in result["rows"] if r.get("tolerance")]
    if not rows:
        return
    names = list(result["backends"])
    figure, axis = plt.subplots(figsize=(max(8, 0.28 * len(rows)), 4.5))
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, row in enumerate(rows):
            r = row["results"].get(name)
            if r and "error" in r:
                xs.append(j + (i - len(names) / 2) * 0.12)
                ys.append(max(r["error"] / row["tolerance"], 1e-8))
        axis.scatter(xs, ys, label=name, s=18)
    axis.axhline(1.0, color="red", linewidth=1, label="tolerance")
    axis.set_yscale("log")
    axis.set_xticks(range(len(rows)), [_key(r) for r in rows], rotation=90, fontsize=7)
    axis.set_ylabel("error / tolerance")
    axis.set_title("Each backend against the NumPy reference (below the red line passes)")
    axis.legend(fontsize=8)
    save_png(figure, path)


def plot_cross(result, path) -> None:
    import numpy as np

    cross = result["cross"]["errors"]
    if not cross:
        return
    plt = pyplot()
    loaders = list(cross)
    sources = list(next(iter(cross.values())))
    matrix = np.array([[cross[l].get(s, np.nan) for l in loaders] for s in sources])
    figure, axis = plt.subplots(figsize=(5.5, 4.5))
    image = axis.imshow(
        np.log10(np.maximum(matrix, 1e-12)),
        cmap="viridis",
        vmin=-12,
        vmax=max(-3, np.log10(result["cross"]["tolerance"]) + 1),
    )
    for i in range(len(sources)):
        for j in range(len(loaders)):
            axis.text(j, i, f"{matrix[i, j]:.1e}", ha="center", va="center", color="white", fontsize=8)
    axis.set_xticks(range(len(loaders)), loaders)
    axis.set_yticks(range(len(sources)), sources)
    axis.set_xlabel("loaded into")
    axis.set_ylabel("exported by")
    axis.set_title("Logit error on another backend's weights")
    figure.colorbar(image, label="log10 relative error")
    save_png(figure, path)


def plot_training(result, path) -> None:
    train = result.get("training")
    if not train or not train["curves"]:
        return
    plt = pyplot()
    import numpy as np

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in train["curves"].items():
        losses = np.asarray(curve["batch_losses"])
        window = max(1, len(losses) // 25)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        left.plot(np.arange(len(smooth)) + window, smooth, label=name)
        right.plot(range(1, len(curve["test_acc"]) + 1), curve["test_acc"], marker="o", label=name)
    left.set_xlabel("step")
    left.set_ylabel(f"training loss (moving average of {window})")
    right.set_xlabel("epoch")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_ylabel("test accuracy")
    for group, g in train["recipes"].items():
        right.axhline(g["min_test_acc"], color="gray", linestyle="--", linewidth=1, label=f"required ({group})")
    for axis in (left, right):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.suptitle(f"Fashion-MNIST, recipe {train['recipe']}, same weights and batches in every backend")
    save_png(figure, path)


def publish(out_dir, dest: Path) -> None:
    """Copy the report and its plots to `dest` (docs/results), each file atomically."""
    publish_files(out_dir, dest, ("report.md", "report.json", *PLOTS))
