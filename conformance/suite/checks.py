"""Compare a backend with the NumPy reference on shared canonical weights.

Every number here is a relative error: the largest absolute difference divided by the
largest magnitude of the reference, per tensor for gradients and updates (the worst tensor
is reported). A tensor's scale is never taken below 1/1000 of the largest gradient in the
network: conv biases followed by train-mode BatchNorm have a true gradient of exactly zero,
which would otherwise turn rounding noise into an infinite relative error.

The checks run twice. In float32, the precision people train in, the forward pass is
well conditioned and its tolerances are tight. Its gradients are not: a DenseNet with
train-mode BatchNorm is not smooth at float32 scale (a ReLU input within rounding error of
zero switches a gradient path on or off, and batch statistics spread the change), so the
reference's own gradients move by up to ~30% when its input moves by one part in a million
(measured on BC-100-12 and densenet121; docs/numerics.md). Float32 gradients are therefore
held only to a coarse tolerance that catches gross errors (wrong sign, scale, layout, a
missing path), and the same checks run again in float64, where every backend must match the
reference to near machine precision.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import reference
from ..specs import get_spec, is_running_stat, to_layout
from ..weights import init_state

DTYPES = ("float32", "float64")
TOLERANCES = {
    "float32": {
        "forward_eval": 1e-5,
        "forward_train": 1e-4,
        "loss": 1e-5,
        "running_stats_update": 1e-4,
        "gradients": 0.5,
        "sgd_update": 0.5,
    },
    "float64": {
        "forward_eval": 1e-12,
        "forward_train": 1e-12,
        "loss": 1e-12,
        "running_stats_update": 1e-12,
        "gradients": 1e-10,
        "sgd_update": 1e-10,
    },
}


class Config(NamedTuple):
    """One net of a conformance matrix: its input size and batch, whether the trainer's step is
    checked on it, and whether float32 checks its train-mode pass too (see compare_with_reference)."""

    arch: str
    size: int
    batch: int
    trainer_step: bool = True
    float32_training: bool = True


LR = 0.1  # one plain SGD step; compared as the update (new - old), not as the new value
SCALE_FLOOR = 1e-3  # a tensor's scale is at least this fraction of the largest gradient


def relative_error(actual, expected, scale: float | None = None) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    if expected.size == 0:
        return 0.0
    scale = max(np.abs(expected).max(), scale or 0.0, 1e-30)
    return float(np.abs(actual - expected).max() / scale)


def worst_error(actual: dict, expected: dict) -> tuple[float, str]:
    """The largest per-tensor relative error and its key (inf if a key is missing or mis-shaped)."""
    floor = SCALE_FLOOR * max((np.abs(v).max() for v in expected.values() if np.size(v)), default=0.0)
    worst, worst_key = -1.0, ""
    for key, value in expected.items():
        error = relative_error(actual[key], value, floor) if key in actual else float("inf")
        if error > worst:
            worst, worst_key = error, key
    return worst, worst_key


def make_batch(spec, size: int, batch: int, seed: int):
    """A float32 NCHW batch and labels drawn from `seed`."""
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((batch, spec.in_channels, size, size)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, batch).astype(np.int64)
    return x, y


def measurement(error: float, tolerance: float, **details) -> dict:
    return {"error": error, "tolerance": tolerance, "passed": bool(error <= tolerance), **details}


def checked_spec(arch):
    """The spec the checks build: dropout off, so that train-mode passes are deterministic."""
    return get_spec(arch).replace(drop_rate=0.0)


def compare_with_reference(
    backend,
    arch,
    size: int,
    batch: int = 4,
    seed: int = 0,
    dtypes=DTYPES,
    memory_efficient: bool = False,
    trainer_step: bool = True,
    float32_training: bool = True,
    float32_model=None,
) -> dict:
    """{dtype: {check: measurement}} for `backend` against the float64 reference.

    The state has random BatchNorm parameters and statistics (so gamma, beta, mean and
    variance cannot be confused unnoticed); the input is in the backend's own layout. Each
    check starts from a freshly loaded state, since train-mode passes move running statistics.
    `memory_efficient` builds the backend's recomputing model: it must give the same numbers,
    and move the running statistics once per step although it runs BatchNorm twice.
    `trainer_step` also takes one step with the backend's trainer (check sgd_update) and reads
    the running statistics after it; without it they are read after the gradients' train-mode
    pass, and the big nets skip the trainer program, which TF and JAX take ~20 s each to build.
    Without `float32_training`, float32 checks the eval forward pass only: the train-mode pass
    is the same code in both dtypes, held to near machine precision in float64, and in float32
    to coarse tolerances only (the module docstring); JAX compiles a program for it per net and
    dtype. `float32_model`: the caller's float32 model of checked_spec(arch), already built.
    """
    spec = checked_spec(arch)
    state = init_state(spec, seed, randomize_bn=True)
    x, y = make_batch(spec, size, batch, seed)
    ref_eval = reference.forward(spec, state, x, train=False)
    ref = reference.loss_and_gradients(spec, state, x, y)
    lr, bn_momentum = effective_hyperparameters(backend)
    expected = Expected(
        update={key: -lr * grad for key, grad in ref.grads.items()},
        stats=reference.update_running_stats(state, ref.batch_stats, backend.running_var, bn_momentum),
        other_stats=reference.update_running_stats(
            state, ref.batch_stats, other_convention(backend.running_var), bn_momentum
        ),
    )

    def model(dtype):
        return (
            float32_model
            if dtype == "float32" and float32_model is not None
            else backend.build(spec, dtype, memory_efficient)
        )

    return {
        dtype: _compare(
            model(dtype),
            backend,
            state,
            to_layout(x, backend.layout).astype(dtype),
            y,
            ref_eval,
            ref,
            expected,
            TOLERANCES[dtype],
            trainer_step,
            training=float32_training or dtype != "float32",
        )
        for dtype in dtypes
    }


class Expected(NamedTuple):
    update: dict  # the reference's parameter update for one SGD step
    stats: dict  # running statistics after the step, under the backend's variance convention
    other_stats: dict  # the same under the other convention


def effective_hyperparameters(backend) -> tuple[float, float]:
    """The learning rate and BatchNorm momentum (PyTorch's convention) the backend really uses."""
    if backend.float32_hyperparameters:
        return float(np.float32(LR)), 1.0 - float(np.float32(1.0 - reference.BN_MOMENTUM))
    return LR, reference.BN_MOMENTUM


def other_convention(running_var: str) -> str:
    return "biased" if running_var == "unbiased" else "unbiased"


def _compare(model, backend, state, x, y, ref_eval, ref, expected, tolerances, trainer_step=True, training=True):
    results = {}

    backend.load_state(model, state)
    results["forward_eval"] = measurement(
        relative_error(backend.forward(model, x, train=False), ref_eval), tolerances["forward_eval"]
    )
    if not training:
        return results

    backend.load_state(model, state)
    logits, loss, grads = backend.train_pass(model, x, y)
    results["forward_train"] = measurement(relative_error(logits, ref.logits), tolerances["forward_train"])
    results["loss"] = measurement(relative_error(loss, ref.loss), tolerances["loss"], value=loss, reference=ref.loss)
    error, key = worst_error(grads, ref.grads)
    results["gradients"] = measurement(error, tolerances["gradients"], worst_key=key, tensors=len(ref.grads))
    if not trainer_step:  # the train-mode pass moved the running statistics once
        results["running_stats_update"] = _compare_running_stats(
            backend, state, backend.export_state(model), expected, tolerances
        )
        return results

    backend.load_state(model, state)
    backend.make_trainer(model, LR).train_step(x, y)
    new = backend.export_state(model)
    results["sgd_update"] = _compare_update(state, new, expected, tolerances)
    results["running_stats_update"] = _compare_running_stats(backend, state, new, expected, tolerances)
    return results


def deltas(old, new, keys):
    return {key: np.asarray(new[key], np.float64) - np.asarray(old[key], np.float64) for key in keys}


def _compare_update(old, new, expected, tolerances):
    """The SGD step's parameter updates against the reference's."""
    trainable = [key for key in old if not is_running_stat(key)]
    error, key = worst_error(deltas(old, new, trainable), expected.update)
    return measurement(error, tolerances["sgd_update"], worst_key=key)


def _compare_running_stats(backend, old, new, expected, tolerances):
    """The running-statistic updates against the reference's, also under the other variance
    convention, which shows how large the PyTorch-versus-the-rest difference is at this batch."""
    running = [key for key in old if is_running_stat(key)]
    error, key = worst_error(deltas(old, new, running), deltas(old, expected.stats, running))
    other_error, _ = worst_error(deltas(old, new, running), deltas(old, expected.other_stats, running))
    return measurement(
        error,
        tolerances["running_stats_update"],
        worst_key=key,
        convention=backend.running_var,
        error_under_other_convention=other_error,
    )


def gradient_sensitivity(arch, size: int, batch: int = 4, seed: int = 0, relative: float = 1e-6) -> dict:
    """How far the reference's own float64 gradients move when its input moves by `relative`
    (one part in a million, about the accumulated rounding of a float32 forward pass): the
    error floor any float32 gradient comparison at this point can expect."""
    spec = get_spec(arch).replace(drop_rate=0.0)
    state = init_state(spec, seed, randomize_bn=True)
    x, y = make_batch(spec, size, batch, seed)
    base = reference.loss_and_gradients(spec, state, x, y)
    noise = np.random.default_rng(seed + 2).standard_normal(x.shape)
    moved = reference.loss_and_gradients(spec, state, x.astype(np.float64) * (1 + relative * noise), y)
    error, key = worst_error(moved.grads, base.grads)
    return {"relative_input_change": relative, "gradient_change": error, "worst_key": key}


def all_passed(results: dict) -> bool:
    return all(item["passed"] for checks in results.values() for item in checks.values())
