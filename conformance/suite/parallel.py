"""The data-parallel check of `make conformance`: each backend's engine on 2 devices (simulated
on a CPU) against the NumPy reference's data-parallel step, for the BatchNorm semantics the
engine declares (conformance.engines), and a short data-parallel run against the single-device
run. It runs in a process of its own, started by conformance.engines.launch:

    python -m conformance.suite.parallel check --backend jax --devices 2 --out dp.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import traceback
from functools import partial
from pathlib import Path

import numpy as np

from .. import reference, training
from ..engines import ENGINES, device_kind, launch, prepare, process_index
from ..files import merge_json, read_json, write_json
from ..interface import BackendUnavailable
from ..specs import get_spec, is_running_stat, to_layout
from ..weights import init_state
from . import checks

CHECK_ARCH, CHECK_SIZE, CHECK_BATCH, CHECK_STEPS = "tiny", 16, 4, 3
SEMANTICS_APART = 1e-6  # float64: the other semantics' step must differ from ours by more than this
TIMEOUT_S = 1200


def compare_states(old, new, expected, other) -> dict:
    """Errors of the step old -> new against the reference's old -> expected (and -> other,
    the other BatchNorm semantics' step), for the weights and the running statistics."""
    trainable = [key for key in old if not is_running_stat(key)]
    running = [key for key in old if is_running_stat(key)]
    result = {}
    for label, keys in (("weights", trainable), ("running", running)):
        actual = checks.deltas(old, new, keys)
        result[label] = checks.worst_error(actual, checks.deltas(old, expected, keys))
        result[f"{label}_other"] = checks.worst_error(actual, checks.deltas(old, other, keys))[0]
    return result


def derived(tolerance: tuple[float, str]) -> dict:
    """The derivation beside a tolerance, where it has one."""
    return {"derivation": tolerance[1]} if tolerance[1] else {}


def _rows(config, dtype, tolerances, errors, loss=None) -> list[dict]:
    row = {"config": config, "dtype": dtype}
    rows = []
    if loss is not None:
        measured = checks.measurement(loss[0], tolerances["loss"][0], value=loss[1], **derived(tolerances["loss"]))
        rows.append({**row, "check": "dp loss", **measured})
    prefix = "dp one step" if loss is not None else "dp few steps"
    for label, check in (("weights", "sgd_update"), ("running", "running_stats_update")):
        error, key = errors[label]
        measured = checks.measurement(
            error,
            tolerances[check][0],
            worst_key=key,
            error_under_other_semantics=errors[f"{label}_other"],
            **derived(tolerances[check]),
        )
        rows.append({**row, "check": f"{prefix} {check}", **measured})
    if dtype == "float64" and loss is not None:  # the other semantics' step, far beyond float64 rounding
        rows.append(
            {
                **row,
                "check": "dp tells the semantics apart",
                "passed": bool(errors["weights_other"] > SEMANTICS_APART),
                "value": errors["weights_other"],
                "expected": f"> {SEMANTICS_APART}",
            }
        )
    return rows


def check(
    backend,
    module,
    devices: int = 2,
    arch=CHECK_ARCH,
    size: int = CHECK_SIZE,
    batch: int = CHECK_BATCH,
    steps: int = CHECK_STEPS,
    seed: int = 0,
    progress: bool = False,
    dtypes=checks.DTYPES,
) -> list[dict]:
    """Rows (report format) for every BatchNorm semantics the backend declares on this device
    kind and every dtype it allows: one SGD step on a global batch of `batch` split over
    `devices`, then `steps` steps, against the reference's data-parallel step."""
    from tqdm.auto import tqdm

    spec = get_spec(arch).replace(drop_rate=0.0)
    state = init_state(spec, seed, randomize_bn=True)
    lr, momentum = checks.effective_hyperparameters(backend)
    batches = [checks.make_batch(spec, size, batch, seed + k) for k in range(steps)]
    declared = ENGINES[backend.name]
    semantics = declared.bn_semantics.get(device_kind(backend), ())
    jobs = [(sem, dtype) for sem in semantics for dtype in module.DTYPES[sem] if dtype in dtypes]
    rows = []
    for sem, dtype in tqdm(jobs, desc=f"{backend.name} data-parallel check", disable=not progress):
        other = next(s for s in reference.BN_SEMANTICS if s != sem)
        config = f"dp{devices} {spec.name}@{size} {sem}"
        model = backend.build(spec, dtype)
        backend.load_state(model, state)
        trainer = module.make_trainer(backend, model, checks.LR, 0.0, "fp32", devices, sem == "sync")
        for n, (x, y) in enumerate(batches, start=1):  # the first step, then the last of `steps`
            loss = trainer.train_step(to_layout(x, backend.layout).astype(dtype), y)[0]
            if n not in (1, steps):
                continue
            (ours, ref_losses), (theirs, _) = [
                reference.data_parallel_train(
                    spec,
                    state,
                    batches[:n],
                    lr,
                    devices,
                    semantics,
                    declared.running_stats,
                    backend.running_var,
                    momentum,
                )
                for semantics in (sem, other)
            ]
            errors = compare_states(state, backend.export_state(model), ours, theirs)
            first = (checks.relative_error(loss, ref_losses[0]), loss) if n == 1 else None
            if dtype == "float64":
                tolerances = {check: (value, "") for check, value in checks.TOLERANCES[dtype].items()}
            else:
                train = partial(
                    reference.data_parallel_train,
                    spec,
                    state,
                    lr=lr,
                    devices=devices,
                    bn=sem,
                    running_stats=declared.running_stats,
                    running_var=backend.running_var,
                    momentum=momentum,
                )
                single = checks.float32_conditioning(arch, size, batch, seed)  # on batches[0]
                tolerances = float32_tolerances(train, state, batches[:n], (ours, ref_losses), single, seed)
            rows += _rows(config, dtype, tolerances, errors, first)
    return rows


def float32_tolerances(train, state, batches, base, single: dict | None = None, seed: int = 0) -> dict:
    """{check: (tolerance, derivation)} of the float32 data-parallel rows, derived as the
    single-device ones are (checks.float32_conditioning): TOLERANCE_MULTIPLE times the larger of
    how far the reference's data-parallel steps move when their inputs move by one part in a
    million, and how far they move when its arithmetic runs in float32 (the new state rounded to
    float32). `train(batches, dtype=...)`: the reference's steps from `state`; `base`: their
    float64 result. The loss's prediction is at least what the single-device pass on the first
    batch (`single`: its float32_conditioning) predicts from its logits' error."""
    base_state, base_losses = base
    moved_batches = [(checks.moved_input(x, seed + k), y) for k, (x, y) in enumerate(batches)]
    moved = train(moved_batches)
    own = train([(x.astype(np.float32), y) for x, y in batches], dtype=np.float32)
    result = {}
    for label, check in (("weights", "sgd_update"), ("running", "running_stats_update")):
        changes = [compare_states(state, new, base_state, base_state)[label][0] for new, _ in (moved, own)]
        result[check] = changes
    result["loss"] = [checks.relative_error(losses[0], base_losses[0]) for _, losses in (moved, own)]
    if single is not None:
        result["loss"].append(single["loss_from_logits"])
    multiple = checks.TOLERANCE_MULTIPLE
    tolerances = {}
    for check, (moved_error, own_error, *from_logits) in result.items():
        words = f"{multiple} x max(conditioning {moved_error:.1e}, reference in float32 {own_error:.1e}"
        words += f", from the logits' prediction {from_logits[0]:.1e})" if from_logits else ")"
        tolerances[check] = (multiple * max(moved_error, own_error, *from_logits), words)
    return tolerances


def launch_check(
    name: str,
    out,
    devices: int = 2,
    device: str = "cpu",
    timeout: float = TIMEOUT_S,
    log=None,
    extra: list[str] = (),
    env: dict | None = None,
) -> dict:
    """The data-parallel check of backend `name` in a process of its own; its result dict
    (status ok with rows, skipped with a reason, or error)."""
    out = Path(out)
    args = [
        "-m",
        "conformance.suite.parallel",
        "check",
        "--backend",
        name,
        "--devices",
        str(devices),
        "--device",
        device,
        "--out",
        str(out),
        *extra,
    ]
    for path in (out, Path(log or os.devnull)):
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(log or os.devnull, "w") as stream:
        code = launch(name, devices, args, timeout, env, stdout=stream, stderr=subprocess.STDOUT)
    if out.is_file():
        return json.loads(out.read_text())
    reason = f"timed out after {timeout} s" if code == -1 else f"exited with code {code}"
    return {"status": "error", "reason": f"data-parallel check {reason}" + (f"; log: {log}" if log else "")}


def run_check(args) -> dict:
    try:
        backend, module = prepare(args.backend, args.devices, args.device)
    except BackendUnavailable as error:  # NoDataParallel too
        return {"status": "skipped", "reason": str(error)}
    try:
        rows = check(
            backend,
            module,
            args.devices,
            args.arch,
            args.size,
            args.batch,
            args.steps,
            progress=process_index() == 0,
            dtypes=args.dtypes.split(","),
        )
        training = train_recipe(backend, args.recipe, args.devices, args.train_dir, args.data_dir)
    except Exception as error:
        return {"status": "error", "reason": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    declared = ENGINES[backend.name]
    return {
        "status": "ok",
        "device": backend.device_name,
        "devices": args.devices,
        "engine": declared.engine,
        "bn_semantics": list(declared.bn_semantics.get(device_kind(backend), ())),
        "running_stats": declared.running_stats,
        "running_var": backend.running_var,
        "rows": rows,
        "training": training,
    }


def train_recipe(backend, recipe_name: str, devices: int, run_dir, data_dir=None) -> dict | None:
    """The conformance recipe trained data-parallel (per-shard BatchNorm, which every engine
    runs) in `run_dir`, continuing the run there if it holds one (conformance_phase branches the
    single-device run into it); the summary of its last epoch."""
    if not recipe_name:
        return None
    recipe = training.get_recipe(recipe_name)
    record = training.train(backend, "d2l", recipe, run_dir, data_dir, resume=True, progress=False, devices=devices)
    return {
        "recipe": recipe.name,
        "max_spread": recipe.max_spread,
        **{k: record[k] for k in ("devices", "bn_semantics")},
        "epochs": [
            e["epoch"] for e in record["epochs"] if e["epoch"] > record.get("branched_from", {}).get("epoch", 0)
        ],
        **{k: record["epochs"][-1][k] for k in ("test_acc", "loss", "examples_per_s")},
    }


def conformance_phase(
    name: str, out_dir: Path, device: str, recipe: str = "", data_dir=None, env: dict | None = None
) -> None:
    """`make conformance`'s data-parallel part for backend `name`, after its checks phase:
    the check on 2 devices in a process of its own, which also trains the recipe's last epoch
    on them, continuing the single-device run from the epoch before (a short run whose final
    accuracy is compared with the single-device run's); the rows join the backend's result,
    and a run without distributed.py is noted as skipped."""
    path = out_dir / f"{name}.json"
    if read_json(path).get("status") != "ok":
        return
    run_dir = out_dir / "data_parallel" / "train-dp" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    single = (read_json(path).get("training") or {}).get("epochs") or []
    rows = []
    if recipe and len(single) > 1:
        try:
            training.branch(out_dir / "train" / name, run_dir, len(single) - 1)
        except training.TrainingError as error:  # the single-device run's files are gone or damaged
            rows.append(
                {
                    "config": "dp2",
                    "check": "branch the single-device run",
                    "passed": False,
                    "value": str(error),
                    "expected": "its second-to-last epoch's files",
                }
            )
            recipe, single = "", []  # the check still runs, without the recipe
    extra = ["--recipe", recipe, "--train-dir", str(run_dir)] + (["--data-dir", str(data_dir)] if data_dir else [])
    result = launch_check(
        name,
        out_dir / "data_parallel" / f"{name}.json",
        2,
        device,
        log=out_dir / "logs" / f"{name}.data_parallel.log",
        extra=extra,
        env=env,
    )
    rows += result.get("rows", [])
    parallel = result.get("training")
    if parallel and single:
        difference = abs(parallel["test_acc"] - single[-1]["test_acc"])
        first, last = parallel["epochs"][0], parallel["epochs"][-1]
        epochs = f"epoch {last}" if first == last else f"epochs {first}-{last}"
        rows.append(
            {
                "config": f"dp2 d2l {parallel['recipe']} {parallel['bn_semantics']} {epochs}",
                "check": "dp test accuracy vs 1 device",
                **checks.measurement(difference, parallel["max_spread"], value=parallel["test_acc"]),
            }
        )
    if result["status"] == "error":
        rows.append(
            {
                "config": "dp2",
                "check": "data-parallel check",
                "passed": False,
                "value": result["reason"],
                "expected": "it runs",
            }
        )
    earlier = read_json(path).get("rows", [])  # read now: the worker may have written since
    merge_json(path, {"rows": earlier + rows, "data_parallel": {k: v for k, v in result.items() if k != "rows"}})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.suite.parallel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="job", required=True)
    p = sub.add_parser("check", help="one step and a few steps on N devices against the reference")
    p.add_argument("--backend", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default=CHECK_ARCH)
    p.add_argument("--size", type=int, default=CHECK_SIZE)
    p.add_argument("--batch", type=int, default=CHECK_BATCH)
    p.add_argument("--steps", type=int, default=CHECK_STEPS)
    p.add_argument("--dtypes", default=",".join(checks.DTYPES), help="comma-separated (default: both)")
    p.add_argument("--recipe", default="", help="also train this recipe data-parallel (default: none)")
    # Not --run: torchrun, which passes these on, would take it for its own --run-path.
    p.add_argument("--train-dir", help="the recipe's run directory (needed with --recipe); a run there is continued")
    p.add_argument("--data-dir")
    p.add_argument("--out", required=True, help="result JSON")
    args = parser.parse_args(argv)
    if args.recipe and not args.train_dir:
        parser.error("--recipe needs --train-dir DIR, the run directory to train (or continue) it in")
    result = run_check(args)
    if process_index() == 0:
        write_json(args.out, result)
        failed = [f"{r['config']} {r['dtype']} {r['check']}" for r in result.get("rows", []) if not r["passed"]]
        print(
            f"{args.backend}: {result['status']}"
            + (f": {result.get('reason')}" if result.get("reason") else "")
            + (f"; FAILED: {', '.join(failed)}" if failed else "")
        )
    if process_index():  # rank 0 judges: between steps DDP's other ranks hold their own statistics
        return 0
    return 1 if result["status"] == "error" or any(not r["passed"] for r in result.get("rows", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
