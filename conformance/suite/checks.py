"""Compare a backend with the NumPy reference on shared canonical weights.

Every number here is a relative error: the largest absolute difference divided by the
largest magnitude of the reference, per tensor for gradients and updates (the worst tensor
is reported). Gradients that are exactly zero in exact arithmetic (every conv bias: each
conv output reaches the loss only through a train-mode BatchNorm, which subtracts the batch
mean; see exact_zero_gradients) are checked apart, as an absolute bound relative to the
largest gradient in the network (check zero_gradients); the relative checks cover the rest.

The checks run twice. In float32, the precision people train in, the forward pass is
well conditioned and its tolerances are tight (derived as below, from the reference's own
float32 error and conditioning: float32_forward_tolerance, float32_conditioning). Its
gradients are less so: a DenseNet with
train-mode BatchNorm is not smooth at float32 scale (a ReLU input within rounding error of
zero switches a gradient path on or off, and batch statistics spread the change). So the
float32 gradient and update tolerances are derived per configuration from the reference
itself (float32_conditioning): how far its gradients move when its input moves by one part
in a million, and how far they move when the same arithmetic runs in float32; the tolerance
is TOLERANCE_MULTIPLE times the larger (docs/numerics.md). The same checks run again in
float64, where every backend must match the reference to near machine precision.

Each trainer arithmetic mode (interface.PRECISIONS) is checked on one small net
(check_precisions): one step's loss and parameter update against the reference's, with a
tolerance derived the same way from the reference evaluated on input and weights rounded to
that mode's format.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import interface, reference
from ..specs import get_spec, is_running_stat, parameter_table, to_layout
from ..weights import init_state

DTYPES = ("float32", "float64")
# float64: fixed, near machine precision. float32: derived per configuration from the reference
# itself (float32_forward_tolerance, float32_conditioning; the data-parallel rows in
# suite/parallel.py the same way); no fixed float32 tolerance is used.
TOLERANCES = {
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
# Unit roundoff of each arithmetic: float32 and fp32 keep 23 mantissa bits, TF32 10, bfloat16 7.
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float64": 2.0**-53, "fp32": 2.0**-24, "tf32": 2.0**-11, "bf16": 2.0**-8}
MANTISSA_BITS = {"tf32": 10, "bf16": 7}
# A derived tolerance is this multiple of the error its derivation predicts: the prediction is
# the reference's own error at that precision, and another correct implementation orders its
# sums differently (measured: the four backends land within 0.1x to 5x of it; docs/numerics.md).
TOLERANCE_MULTIPLE = 10
# The arithmetic modes are checked on one small net, one trainer step each.
PRECISION_CONFIG = ("tiny_d2l", 13, 4)


def exact_zero_gradients(spec) -> frozenset:
    """The parameters whose gradient is exactly zero in exact arithmetic: every conv bias.

    In a DenseNet every convolution's output reaches the loss only through train-mode
    BatchNorms (the stem's conv feeds norm0; a dense layer's output is normalised by every later
    layer, transition and norm5 that reads it; a transition's conv passes an average pool, which
    keeps a per-channel constant constant). A per-channel constant added before a BatchNorm that
    subtracts the batch mean cannot change the loss. Dropout (off in the checks) would break this.
    """
    spec = get_spec(spec)
    if spec.drop_rate > 0 or not spec.conv_bias:
        return frozenset()
    table = parameter_table(spec)
    return frozenset(
        key for key in table if key.endswith(".bias") and len(table.get(key[: -len("bias")] + "weight", ())) == 4
    )


def network_error(actual: dict, expected: dict, skip=()) -> tuple[float, str]:
    """The largest difference in any tensor, relative to the largest reference value in the
    network, and where it is. The measure of the fast arithmetic modes: at bfloat16's 8 bits a
    tensor whose gradient cancels to a small sum (a BatchNorm scale) has a per-tensor error of
    order one in any correct implementation, the reference's own included."""
    largest = max((np.abs(v).max() for k, v in expected.items() if k not in skip and np.size(v)), default=0.0)
    worst, worst_key = 0.0, ""
    for key, value in expected.items():
        if key in skip:
            continue
        difference = (
            float(np.abs(np.asarray(actual[key], np.float64) - value).max())
            if key in actual and np.shape(actual[key]) == np.shape(value)
            else np.inf
        )
        difference = np.inf if np.isnan(difference) else difference
        if difference >= worst:
            worst, worst_key = difference, key
    return worst / max(largest, 1e-30), worst_key


def zero_gradient_tolerance(dtype: str, size: int, batch: int) -> float:
    """The bound on an exact-zero gradient, relative to the largest gradient: a conv bias's
    gradient is a sum over batch x height x width terms (at most batch x size^2) that cancel
    exactly; rounding leaves about u x sqrt(terms) of the largest term (a random walk), and
    the tolerance is TOLERANCE_MULTIPLE times that."""
    return TOLERANCE_MULTIPLE * UNIT_ROUNDOFF[dtype] * float(np.sqrt(batch * size * size))


def zero_gradient_derivation(dtype: str) -> str:
    return f"{TOLERANCE_MULTIPLE} x u({dtype}) {UNIT_ROUNDOFF[dtype]:.1e} x sqrt(batch x size^2)"


def zero_gradient_error(actual: dict, expected: dict, keys) -> tuple[float, str]:
    """The largest |gradient| among `keys`, relative to the largest reference gradient in the network."""
    largest = max((np.abs(v).max() for v in expected.values() if np.size(v)), default=0.0)
    worst, worst_key = 0.0, ""
    for key in sorted(keys):
        value = (
            float(np.abs(np.asarray(actual[key], np.float64)).max()) / max(largest, 1e-30) if key in actual else np.inf
        )
        value = np.inf if np.isnan(value) else value
        if value > worst or not worst_key:
            worst, worst_key = value, key
    return worst, worst_key


def relative_error(actual, expected, scale: float | None = None) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    if expected.size == 0:
        return 0.0
    scale = max(np.abs(expected).max(), scale or 0.0, 1e-30)
    return float(np.abs(actual - expected).max() / scale)


def worst_error(actual: dict, expected: dict, skip=()) -> tuple[float, str]:
    """The largest per-tensor relative error and its key (inf if a key is missing or mis-shaped);
    the keys in `skip` (exact-zero gradients) are left out."""
    floor = SCALE_FLOOR * max((np.abs(v).max() for v in expected.values() if np.size(v)), default=0.0)
    worst, worst_key = -1.0, ""
    for key, value in expected.items():
        if key in skip:
            continue
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


# The cross-backend check: every backend steps once from shared weights and exports; every
# backend then evaluates every export. The d2l net at the matrix's size and batch (the trainer
# step compiles once in JAX).
CROSS_ARCH, CROSS_SIZE, CROSS_BATCH, CROSS_SEED = "d2l", 96, 4, 11


def cross_batch():
    """(spec, shared starting state, batch, labels) of the cross-backend check."""
    spec = get_spec(CROSS_ARCH)
    x, y = make_batch(spec, CROSS_SIZE, CROSS_BATCH, CROSS_SEED)
    return spec, init_state(spec, CROSS_SEED, randomize_bn=True), x, y


def cross_tolerance() -> tuple[float, str]:
    """Two backends' logits on the same weights each land within the float32 eval tolerance of
    the reference, so within twice it of each other: derived on the cross batch at the shared
    starting weights (the exports are one SGD step of lr 0.1 from them)."""
    spec, state, x, _ = cross_batch()
    tolerance, words = float32_forward_tolerance(spec, state, x, reference.forward(spec, state, x), CROSS_SEED)
    return 2 * tolerance, f"2 x {words}"


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
    conditioning: dict | None = None,
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
    to tolerances their conditioning allows (float32_conditioning); JAX compiles a program for it per net and
    dtype. `float32_model`: the caller's float32 model of checked_spec(arch), already built.
    `conditioning`: float32_conditioning of this configuration, if already measured (it is
    measured here when float32 gradients are checked without it). Each dtype runs inside the
    backend's dtype_scope, so that float32 is true float32 whatever ran before.
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

    if "float32" in dtypes and float32_training and conditioning is None:
        conditioning = float32_conditioning(arch, size, batch, seed)
    forward = float32_forward_tolerance(spec, state, x, ref_eval, seed) if "float32" in dtypes else None

    def compare(dtype):
        with backend.dtype_scope(dtype):
            model = (
                float32_model
                if dtype == "float32" and float32_model is not None
                else backend.build(spec, dtype, memory_efficient)
            )
            return _compare(
                model,
                backend,
                state,
                to_layout(x, backend.layout).astype(dtype),
                y,
                ref_eval,
                ref,
                expected,
                tolerances(dtype, conditioning if float32_training else None, size, batch, forward),
                trainer_step,
                training=float32_training or dtype != "float32",
                zero=exact_zero_gradients(spec),
            )

    return {dtype: compare(dtype) for dtype in dtypes}


def tolerances(dtype: str, conditioning: dict | None, size: int, batch: int, forward=None) -> dict:
    """{check: (tolerance, derivation or "")} for one dtype of one configuration: float64's fixed,
    float32's derived (`forward`: float32_forward_tolerance; `conditioning`: float32_conditioning,
    None when only the eval pass is checked in float32)."""
    result = {check: (value, "") for check, value in TOLERANCES.get(dtype, {}).items()}
    result["zero_gradients"] = (
        zero_gradient_tolerance(dtype, size, batch),
        zero_gradient_derivation(dtype),
    )
    if dtype == "float32" and forward is not None:
        result["forward_eval"] = forward
    if dtype == "float32" and conditioning is not None:
        for check in conditioning["tolerance"]:
            result[check] = (conditioning["tolerance"][check], derivation(conditioning, check))
    return result


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


def _compare(
    model, backend, state, x, y, ref_eval, ref, expected, tolerances, trainer_step=True, training=True, zero=()
):
    results = {}

    def measure(check, error, **details):
        tolerance, words = tolerances[check]
        return measurement(error, tolerance, **details, **({"derivation": words} if words else {}))

    backend.load_state(model, state)
    results["forward_eval"] = measure("forward_eval", relative_error(backend.forward(model, x, train=False), ref_eval))
    if not training:
        return results

    backend.load_state(model, state)
    logits, loss, grads = backend.train_pass(model, x, y)
    results["forward_train"] = measure("forward_train", relative_error(logits, ref.logits))
    results["loss"] = measure("loss", relative_error(loss, ref.loss), value=loss, reference=ref.loss)
    error, key = worst_error(grads, ref.grads, zero)
    results["gradients"] = measure("gradients", error, worst_key=key, tensors=len(ref.grads) - len(zero))
    if zero:
        error, key = zero_gradient_error(grads, ref.grads, zero)
        results["zero_gradients"] = measure("zero_gradients", error, worst_key=key, tensors=len(zero))
    if not trainer_step:  # the train-mode pass moved the running statistics once
        results["running_stats_update"] = _compare_running_stats(
            backend, state, backend.export_state(model), expected, tolerances
        )
        return results

    backend.load_state(model, state)
    backend.make_trainer(model, LR).train_step(x, y)
    new = backend.export_state(model)
    results["sgd_update"] = _compare_update(state, new, expected, tolerances, zero)
    results["running_stats_update"] = _compare_running_stats(backend, state, new, expected, tolerances)
    return results


def deltas(old, new, keys):
    return {key: np.asarray(new[key], np.float64) - np.asarray(old[key], np.float64) for key in keys}


def _compare_update(old, new, expected, tolerances, zero=()):
    """The SGD step's parameter updates against the reference's (exact-zero ones left out: their
    gradients are checked as zero_gradients)."""
    trainable = [key for key in old if not is_running_stat(key)]
    error, key = worst_error(deltas(old, new, trainable), expected.update, zero)
    tolerance, words = tolerances["sgd_update"]
    return measurement(error, tolerance, worst_key=key, **({"derivation": words} if words else {}))


def _compare_running_stats(backend, old, new, expected, tolerances):
    """The running-statistic updates against the reference's, also under the other variance
    convention, which shows how large the PyTorch-versus-the-rest difference is at this batch."""
    running = [key for key in old if is_running_stat(key)]
    error, key = worst_error(deltas(old, new, running), deltas(old, expected.stats, running))
    other_error, _ = worst_error(deltas(old, new, running), deltas(old, expected.other_stats, running))
    tolerance, words = tolerances["running_stats_update"]
    return measurement(
        error,
        tolerance,
        worst_key=key,
        convention=backend.running_var,
        error_under_other_convention=other_error,
        **({"derivation": words} if words else {}),
    )


RELATIVE_INPUT_CHANGE = 1e-6  # about the accumulated rounding of a float32 forward pass


def moved_input(x, seed: int, relative: float = RELATIVE_INPUT_CHANGE) -> np.ndarray:
    """`x` (float64) with every element moved by about `relative` of itself, at random."""
    noise = np.random.default_rng(seed + 2).standard_normal(np.shape(x))
    return np.asarray(x, np.float64) * (1 + relative * noise)


def gradient_sensitivity(
    arch, size: int, batch: int = 4, seed: int = 0, relative: float = RELATIVE_INPUT_CHANGE, base=None
) -> dict:
    """How far the reference's own float64 gradients (and its train-mode logits, loss and
    running statistics) move when its input moves by `relative`: the error floor any float32
    comparison at this point can expect. Exact-zero gradients are left out. `base`: the
    reference's pass on the unmoved input, if already computed."""
    spec = checked_spec(arch)
    state = init_state(spec, seed, randomize_bn=True)
    x, y = make_batch(spec, size, batch, seed)
    base = base or reference.loss_and_gradients(spec, state, x, y)
    moved = reference.loss_and_gradients(spec, state, moved_input(x, seed, relative), y)
    error, key = worst_error(moved.grads, base.grads, exact_zero_gradients(spec))
    return {
        "relative_input_change": relative,
        "gradient_change": error,
        "worst_key": key,
        "forward_train_change": relative_error(moved.logits, base.logits),
        "loss_change": relative_error(moved.loss, base.loss),
        "running_stats_update_change": running_stats_error(state, moved.running_stats, base.running_stats),
    }


def running_stats_error(state, actual: dict, expected: dict) -> float:
    """The worst relative error of the running-statistic updates (new - old) of two passes."""
    running = [key for key in state if is_running_stat(key)]
    return worst_error(deltas(state, actual, running), deltas(state, expected, running))[0]


def float32_forward_tolerance(spec, state, x, ref_eval, seed: int = 0) -> tuple[float, str]:
    """The float32 eval forward pass's tolerance and its derivation: TOLERANCE_MULTIPLE times the
    larger of how far the reference's logits move when its input moves by one part in a million
    and how far they move when its arithmetic runs in float32 (two forward passes: cheap even
    for the big nets, whose gradients are checked in float64 only)."""
    moved = relative_error(reference.forward(spec, state, moved_input(x, seed), train=False), ref_eval)
    own = relative_error(reference.forward(spec, state, x, train=False, dtype=np.float32), ref_eval)
    predicted = max(moved, own)
    words = f"{TOLERANCE_MULTIPLE} x max(conditioning {moved:.1e}, reference in float32 {own:.1e})"
    return TOLERANCE_MULTIPLE * predicted, words


def round_mantissa(x, bits: int) -> np.ndarray:
    """float32 values rounded to `bits` explicit mantissa bits (round to nearest, ties to even):
    bits 7 is bfloat16, 10 TF32's multiplier input."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    drop = 23 - bits
    u = x.view(np.uint32).astype(np.uint64)
    u = (u + ((1 << (drop - 1)) - 1) + ((u >> drop) & 1)) >> drop << drop
    return u.astype(np.uint32).view(np.float32)


def _reference_errors(spec, state, x, y, base, dtype=np.float64) -> dict:
    """The reference's loss, gradient and one-SGD-step update errors, evaluated on `state` and
    `x` in `dtype` arithmetic, against `base` (the float64 pass on the unrounded ones)."""
    zero = exact_zero_gradients(spec)
    moved = reference.loss_and_gradients(spec, state, x, y, dtype=dtype)
    gradients, gradients_key = worst_error(moved.grads, base.grads, zero)
    lr = np.asarray(LR, dtype)  # the update as the backend makes it: new = w - lr * g, in its arithmetic
    update = {
        key: np.asarray(np.asarray(state[key], dtype) - lr * np.asarray(grad, dtype), np.float64)
        - np.asarray(state[key], np.float64)
        for key, grad in moved.grads.items()
    }
    expected = {key: -LR * grad for key, grad in base.grads.items()}
    sgd_update, update_key = worst_error(update, expected, zero)
    running = {key: np.asarray(np.asarray(value, dtype), np.float64) for key, value in moved.running_stats.items()}
    return {
        "sgd_update_network": network_error(update, expected, zero)[0],
        "forward_train": relative_error(moved.logits, base.logits),
        "loss": relative_error(moved.loss, base.loss),
        "running_stats_update": running_stats_error(state, running, base.running_stats),
        "zero_gradients": zero_gradient_error(moved.grads, base.grads, zero)[0] if zero else 0.0,
        "gradients": gradients,
        "gradients_key": gradients_key,
        "sgd_update": sgd_update,
        "sgd_update_key": update_key,
    }


def float32_conditioning(arch, size: int, batch: int = 4, seed: int = 0) -> dict:
    """The float32 gradient and update tolerances of one configuration, with what they come from.

    Two measurements of the reference itself predict the error of a correct float32
    implementation: how far its float64 gradients move when its input moves by one part in a
    million (gradient_sensitivity: the conditioning), and how far they move when the same
    arithmetic runs in float32 (float32_reference: the rounding, with the update rounded as a
    float32 SGD step rounds it). The tolerance is TOLERANCE_MULTIPLE times the larger. The same
    two measurements of the train-mode logits, the loss and the running-statistic updates give
    theirs; the loss's prediction is at least what the predicted error of the logits makes of it
    (logits_to_loss)."""
    spec = checked_spec(arch)
    state = init_state(spec, seed, randomize_bn=True)
    x, y = make_batch(spec, size, batch, seed)
    base = reference.loss_and_gradients(spec, state, x, y)
    sensitivity = gradient_sensitivity(arch, size, batch, seed, base=base)
    own = _reference_errors(spec, state, x, y, base, np.float32)
    predicted = {check: max(sensitivity["gradient_change"], own[check]) for check in ("gradients", "sgd_update")} | {
        check: max(sensitivity[f"{check}_change"], own[check])
        for check in ("forward_train", "loss", "running_stats_update")
    }
    from_logits = logits_to_loss(base, y) * predicted["forward_train"]
    predicted["loss"] = max(predicted["loss"], from_logits)
    tolerance = {check: TOLERANCE_MULTIPLE * value for check, value in predicted.items()}
    return {
        **sensitivity,
        "float32_reference": own,
        "loss_from_logits": from_logits,
        "multiple": TOLERANCE_MULTIPLE,
        "predicted": predicted,
        "tolerance": tolerance,
    }


def logits_to_loss(base, y) -> float:
    """The loss's relative error per relative error of the logits (at the logits' scale): the
    first-order bound sum |dL/dz| x max |z| / L."""
    _, dlogits = reference.cross_entropy(base.logits, np.asarray(y))
    return float(np.abs(dlogits).sum() * np.abs(base.logits).max() / abs(base.loss))


def derivation(conditioning: dict, check: str) -> str:
    """The words beside a derived tolerance in the report."""
    moved = conditioning["gradient_change" if check in ("gradients", "sgd_update") else f"{check}_change"]
    words = (
        f"{conditioning['multiple']} x max(conditioning {moved:.1e}, "
        f"reference in float32 {conditioning['float32_reference'][check]:.1e}"
    )
    if check == "loss":
        words += f", from the logits' prediction {conditioning['loss_from_logits']:.1e}"
    return words + ")"


def precision_tolerances(mode: str, arch, size: int, batch: int = 4, seed: int = 0) -> dict:
    """{check: (tolerance, derivation)} for one trainer step in arithmetic `mode` (PRECISIONS).

    fp32 (and tf32 where it computes fp32): the float32 conditioning. tf32 and bf16 round the
    inputs of every convolution and matrix product to their format: the prediction is the
    reference's own error when its input and weights are rounded so (float64 arithmetic), and
    at least the float32 prediction; the tolerance is TOLERANCE_MULTIPLE times that."""
    conditioning = float32_conditioning(arch, size, batch, seed)
    f32 = conditioning["float32_reference"]
    predicted = {
        "loss": conditioning["predicted"]["loss"],
        "sgd_update": max(conditioning["gradient_change"], f32["sgd_update_network"]),
    }
    words = "float32 prediction"
    if mode in MANTISSA_BITS:
        spec = checked_spec(arch)
        state = init_state(spec, seed, randomize_bn=True)
        x, y = make_batch(spec, size, batch, seed)
        base = reference.loss_and_gradients(spec, state, x, y)
        bits = MANTISSA_BITS[mode]
        rounded = {k: v if is_running_stat(k) else round_mantissa(v, bits) for k, v in state.items()}
        own = _reference_errors(spec, rounded, round_mantissa(x, bits), y, base)
        predicted = {
            "loss": max(predicted["loss"], own["loss"]),
            "sgd_update": max(predicted["sgd_update"], own["sgd_update_network"]),
        }
        words = f"reference on {mode}-rounded input and weights"
    result = {
        check: (TOLERANCE_MULTIPLE * value, f"{TOLERANCE_MULTIPLE} x {words} {value:.1e}")
        for check, value in predicted.items()
    }
    result["zero_gradients"] = (zero_gradient_tolerance(mode, size, batch), zero_gradient_derivation(mode))
    if mode in MANTISSA_BITS:
        # The reference on rounded values still cancels exactly: what is left of an exact zero is
        # the rounding of the terms it sums, which scales with the unit roundoff. Predicted: the
        # reference's own float32 remainder, times u(mode) / u(float32).
        scale = UNIT_ROUNDOFF[mode] / UNIT_ROUNDOFF["float32"]
        value = f32["zero_gradients"] * scale
        result["zero_gradients"] = (
            TOLERANCE_MULTIPLE * value,
            f"{TOLERANCE_MULTIPLE} x reference in float32 {f32['zero_gradients']:.1e} x u({mode}) / u(float32) "
            f"{scale:g}",
        )
    return result


def check_precisions(backend, arch=PRECISION_CONFIG[0], size=PRECISION_CONFIG[1], batch=PRECISION_CONFIG[2], seed=0):
    """{mode: {check: measurement}}: one trainer step per arithmetic mode (PRECISIONS) on a
    float32 model, its loss and parameter update against the reference's (the update at the
    network's scale: network_error). A mode the device
    cannot run (tf32 on a CPU computes fp32; MXNet has no bf16 path) is a measurement marked
    skipped, with the trainer's own words for what it computes."""
    spec = checked_spec(arch)
    state = init_state(spec, seed, randomize_bn=True)
    x, y = make_batch(spec, size, batch, seed)
    ref = reference.loss_and_gradients(spec, state, x, y)
    lr, _ = effective_hyperparameters(backend)
    expected = {key: -lr * grad for key, grad in ref.grads.items()}
    zero = exact_zero_gradients(spec)
    trainable = [key for key in state if not is_running_stat(key)]
    results = {}
    for mode in interface.PRECISIONS:
        model = backend.build(spec)
        backend.load_state(model, state)
        trainer = backend.make_trainer(model, LR, precision=mode)
        if mode != "fp32" and not trainer.arithmetic.startswith(mode):
            reason = f"computes {trainer.arithmetic}"
            results[mode] = {
                check: skipped(reason) for check in ("loss", "sgd_update", "zero_gradients")[: 2 + bool(zero)]
            }
            continue
        tolerances = precision_tolerances(mode, arch, size, batch, seed)
        loss, _ = trainer.train_step(to_layout(x, backend.layout), y)
        update = deltas(state, backend.export_state(model), trainable)
        error, key = network_error(update, expected, zero)
        zero_error, zero_key = zero_gradient_error({k: update[k] / -lr for k in zero}, ref.grads, zero)
        results[mode] = {
            "loss": measurement(
                relative_error(float(loss), ref.loss), tolerances["loss"][0], derivation=tolerances["loss"][1]
            ),
            "sgd_update": measurement(
                error,
                tolerances["sgd_update"][0],
                worst_key=key,
                derivation=tolerances["sgd_update"][1],
                scale="network",
            ),
        }
        if zero:
            results[mode]["zero_gradients"] = measurement(
                zero_error,
                tolerances["zero_gradients"][0],
                worst_key=zero_key,
                tensors=len(zero),
                derivation=tolerances["zero_gradients"][1],
            )
    return results


def skipped(reason: str) -> dict:
    """A check that could not run here, and why: it neither passes nor fails the run."""
    return {"tolerance": None, "passed": True, "skipped": reason}


def all_passed(results: dict) -> bool:
    return all(item["passed"] for checks in results.values() for item in checks.values())
