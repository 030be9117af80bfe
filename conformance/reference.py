"""The oracle: a plain NumPy float64 DenseNet.

Forward in train and eval mode, backward by hand, and one SGD step with BatchNorm
running-statistic updates. Every backend is compared with this, not with another
backend, so no framework judges the others. Its own tests check the backward pass
against finite differences.

Each layer function returns its output and a closure that maps the output's gradient to
the input's gradient, adding parameter gradients into `grads` on the way (a tape).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .specs import channel_plan, get_spec, is_running_stat, validate_input

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch's convention: new = (1 - m) * running + m * batch
RUNNING_VAR_CONVENTIONS = ("unbiased", "biased")  # PyTorch stores the former, the others the latter


class Tape:
    def __init__(self):
        self.backward_fns = []

    def record(self, fn):
        self.backward_fns.append(fn)

    def backward(self, grad):
        for fn in reversed(self.backward_fns):
            grad = fn(grad)
        return grad


def _windows(xp, kh, kw, stride, ho, wo):
    """(N, C, Ho, Wo, kh, kw) view of the padded input's receptive fields."""
    view = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))
    return view[:, :, : stride * (ho - 1) + 1 : stride, : stride * (wo - 1) + 1 : stride]


def conv2d(x, w, b, stride, pad, tape, grads, key):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = _windows(xp, kh, kw, stride, ho, wo)
    out = np.tensordot(cols, w, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
    if b is not None:
        out = out + b[None, :, None, None]

    def backward(dout):
        grads[f"{key}.weight"] = np.tensordot(dout, cols, axes=([0, 2, 3], [0, 2, 3]))
        if b is not None:
            grads[f"{key}.bias"] = dout.sum(axis=(0, 2, 3))
        dcols = np.tensordot(dout, w, axes=([1], [0]))  # (N, Ho, Wo, C, kh, kw)
        dxp = np.zeros_like(xp)
        for i in range(kh):
            for j in range(kw):
                dxp[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride] += dcols[..., i, j].transpose(
                    0, 3, 1, 2
                )
        return dxp[:, :, pad : pad + h, pad : pad + wd]

    tape.record(backward)
    return out


def batch_norm(x, state, key, train, tape, grads, batch_stats):
    gamma, beta = state[f"{key}.weight"], state[f"{key}.bias"]
    shape = (1, -1, 1, 1)
    if train:
        mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
        batch_stats[key] = (mean, var, x.size // x.shape[1])
    else:
        mean, var = state[f"{key}.running_mean"], state[f"{key}.running_var"]
    inv_std = 1.0 / np.sqrt(var + BN_EPS)
    xhat = (x - mean.reshape(shape)) * inv_std.reshape(shape)

    def backward(dout):
        grads[f"{key}.weight"] = (dout * xhat).sum(axis=(0, 2, 3))
        grads[f"{key}.bias"] = dout.sum(axis=(0, 2, 3))
        dxhat = dout * gamma.reshape(shape)
        if not train:
            return dxhat * inv_std.reshape(shape)
        mean_dxhat = dxhat.mean(axis=(0, 2, 3), keepdims=True)
        mean_dxhat_xhat = (dxhat * xhat).mean(axis=(0, 2, 3), keepdims=True)
        return (dxhat - mean_dxhat - xhat * mean_dxhat_xhat) * inv_std.reshape(shape)

    tape.record(backward)
    return xhat * gamma.reshape(shape) + beta.reshape(shape)


def update_running_stats(state, batch_stats, running_var="unbiased", momentum=BN_MOMENTUM):
    """New running statistics from one train pass's batch statistics (mean, biased var, count).

    PyTorch folds in the unbiased variance, var * n / (n - 1); MXNet, Keras and Flax the
    biased one. The two differ by a factor n / (n - 1), large when n (batch x height x width)
    is small.
    """
    if running_var not in RUNNING_VAR_CONVENTIONS:
        raise ValueError(f"running_var must be one of {RUNNING_VAR_CONVENTIONS}, got {running_var!r}")
    updates = {}
    for key, (mean, var, count) in batch_stats.items():
        if running_var == "unbiased":
            var = var * count / (count - 1)
        updates[f"{key}.running_mean"] = (1 - momentum) * np.asarray(
            state[f"{key}.running_mean"], np.float64
        ) + momentum * mean
        updates[f"{key}.running_var"] = (1 - momentum) * np.asarray(
            state[f"{key}.running_var"], np.float64
        ) + momentum * var
    return updates


def relu(x, tape):
    mask = x > 0
    tape.record(lambda dout: dout * mask)
    return x * mask


def max_pool_3x3_s2_p1(x, tape):
    n, c, h, w = x.shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    windows = _windows(xp, 3, 3, 2, ho, wo).reshape(n, c, ho, wo, 9)
    argmax = windows.argmax(axis=-1)  # the first maximum, as every framework picks
    out = np.take_along_axis(windows, argmax[..., None], axis=-1)[..., 0]

    def backward(dout):
        dxp = np.zeros_like(xp)
        for k in range(9):
            i, j = divmod(k, 3)
            dxp[:, :, i : i + 2 * ho : 2, j : j + 2 * wo : 2] += dout * (argmax == k)
        return dxp[:, :, 1 : 1 + h, 1 : 1 + w]

    tape.record(backward)
    return out


def avg_pool_2x2(x, tape):
    n, c, h, w = x.shape
    ho, wo = h // 2, w // 2
    out = x[:, :, : 2 * ho, : 2 * wo].reshape(n, c, ho, 2, wo, 2).mean(axis=(3, 5))

    def backward(dout):
        dx = np.zeros_like(x)
        dx[:, :, : 2 * ho, : 2 * wo] = np.repeat(np.repeat(dout, 2, axis=2), 2, axis=3) / 4.0
        return dx

    tape.record(backward)
    return out


def global_avg_pool(x, tape):
    n, c, h, w = x.shape
    tape.record(lambda dout: np.broadcast_to(dout[:, :, None, None] / (h * w), x.shape).copy())
    return x.mean(axis=(2, 3))


def linear(x, w, b, tape, grads, key):
    def backward(dout):
        grads[f"{key}.weight"] = dout.T @ x
        grads[f"{key}.bias"] = dout.sum(axis=0)
        return dout @ w

    tape.record(backward)
    return x @ w.T + b


class _Net:
    """One forward pass over a spec with a given state, recording the tape."""

    def __init__(self, spec, state, train):
        self.spec, self.state, self.train = spec, state, train
        self.tape, self.grads, self.batch_stats = Tape(), {}, {}
        self.stage_shapes = {}

    def conv(self, x, key, stride=1, pad=0):
        return conv2d(
            x, self.state[f"{key}.weight"], self.state.get(f"{key}.bias"), stride, pad, self.tape, self.grads, key
        )

    def norm_relu(self, x, key):
        x = batch_norm(x, self.state, key, self.train, self.tape, self.grads, self.batch_stats)
        return relu(x, self.tape)

    def dense_layer(self, x, key):
        if self.spec.bn_size is None:
            return self.conv(self.norm_relu(x, f"{key}.norm1"), f"{key}.conv1", pad=1)
        y = self.conv(self.norm_relu(x, f"{key}.norm1"), f"{key}.conv1")
        return self.conv(self.norm_relu(y, f"{key}.norm2"), f"{key}.conv2", pad=1)

    def dense_block(self, x, stage):
        for layer in stage.layers:
            # The tape sees the concat as one step whose backward splits the gradient;
            # the branch's own backward runs inside it.
            branch = Tape()
            outer, self.tape = self.tape, branch
            new = self.dense_layer(x, layer.key)
            self.tape = outer
            c = x.shape[1]

            def backward(dout, branch=branch, c=c):
                return dout[:, :c] + branch.backward(dout[:, c:])

            self.tape.record(backward)
            x = np.concatenate([x, new], axis=1)
        return x

    def transition(self, x, stage):
        key = f"features.{stage.name}"
        return avg_pool_2x2(self.conv(self.norm_relu(x, f"{key}.norm"), f"{key}.conv"), self.tape)

    def forward(self, x):
        for stage in channel_plan(self.spec):
            if stage.name == "stem" and self.spec.stem == "imagenet":
                x = self.norm_relu(self.conv(x, "features.conv0", stride=2, pad=3), "features.norm0")
                x = max_pool_3x3_s2_p1(x, self.tape)
            elif stage.name == "stem":
                x = self.conv(x, "features.conv0", pad=1)
            elif stage.name.startswith("denseblock"):
                x = self.dense_block(x, stage)
            else:
                x = self.transition(x, stage)
            self.stage_shapes[stage.name] = x.shape
        x = global_avg_pool(self.norm_relu(x, "features.norm5"), self.tape)
        return linear(
            x, self.state["classifier.weight"], self.state["classifier.bias"], self.tape, self.grads, "classifier"
        )


def _prepare(spec, state, x, train, dtype=np.float64):
    spec = get_spec(spec)
    if train and spec.drop_rate > 0:
        raise NotImplementedError("the reference has no dropout: compare with drop_rate=0")
    validate_input(spec, np.shape(x), np.asarray(x).dtype.name, "NCHW", expected_dtype=("float32", "float64"))
    state64 = {key: np.asarray(value, dtype=dtype) for key, value in state.items()}
    return spec, state64, np.asarray(x, dtype=dtype)


def forward(spec, state, x, train: bool = False, dtype=np.float64):
    """Logits (float64) for an NCHW batch. In train mode BatchNorm uses batch statistics.
    `dtype` float32 runs the same arithmetic in float32 (see loss_and_gradients)."""
    spec, state64, x = _prepare(spec, state, x, train, dtype)
    return _Net(spec, state64, train).forward(x)


def stage_shapes(spec, state, x):
    """Eval-mode output shape of every stage (NCHW), as the reference computes them."""
    spec, state64, x = _prepare(spec, state, x, False)
    net = _Net(spec, state64, False)
    logits = net.forward(x)
    return {**net.stage_shapes, "logits": logits.shape}


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = -log_probs[np.arange(n), labels].mean()
    dlogits = np.exp(log_probs)
    dlogits[np.arange(n), labels] -= 1.0
    return loss, dlogits / n


class TrainPass(NamedTuple):
    loss: float
    logits: np.ndarray
    grads: dict  # canonical key -> gradient of every trainable parameter
    input_grad: np.ndarray
    batch_stats: dict  # BatchNorm module key -> (mean, biased variance, count) of this batch
    running_stats: dict  # canonical key -> BatchNorm running statistic after this pass


def loss_and_gradients(spec, state, x, labels, running_var: str = "unbiased", dtype=np.float64) -> TrainPass:
    """One train-mode forward and backward pass with mean cross-entropy. `dtype` float32 runs the
    same arithmetic in float32: what a faithful float32 implementation's rounding costs."""
    spec, state64, x = _prepare(spec, state, x, True, dtype)
    net = _Net(spec, state64, True)
    logits = net.forward(x)
    loss, dlogits = cross_entropy(logits, np.asarray(labels))
    input_grad = net.tape.backward(dlogits)
    running_stats = update_running_stats(state64, net.batch_stats, running_var)
    return TrainPass(float(loss), logits, net.grads, input_grad, net.batch_stats, running_stats)


def sgd_step(spec, state, x, labels, lr: float, running_var: str = "unbiased"):
    """One plain SGD step in train mode: the new state (float64) and the loss before it."""
    result = loss_and_gradients(spec, state, x, labels, running_var)
    new_state = {}
    for key, value in state.items():
        if is_running_stat(key):
            new_state[key] = result.running_stats[key]
        else:
            new_state[key] = np.asarray(value, dtype=np.float64) - lr * result.grads[key]
    return new_state, result.loss


def gradient_check(spec, size: int, batch: int = 2, seed: int = 0, samples_per_tensor: int = 2, eps: float = 1e-6):
    """Central finite differences against the backward pass, for sampled entries of every
    parameter tensor and of the input. Returns (worst error, where): the error is
    |numeric - analytic| / (|analytic| + 1e-6), i.e. relative, with an absolute floor of 1e-6."""
    from .weights import init_state

    spec = get_spec(spec).replace(drop_rate=0.0)
    rng = np.random.default_rng(seed)
    state = {key: value.astype(np.float64) for key, value in init_state(spec, seed, randomize_bn=True).items()}
    x = rng.standard_normal((batch, spec.in_channels, size, size))
    labels = rng.integers(0, spec.num_classes, batch)
    result = loss_and_gradients(spec, state, x, labels)
    targets = [(key, state[key], result.grads[key]) for key in result.grads] + [("input", x, result.input_grad)]
    worst, where = 0.0, ""
    for name, array, analytic in targets:
        flat, grad = array.reshape(-1), analytic.reshape(-1)
        for index in rng.choice(flat.size, min(samples_per_tensor, flat.size), replace=False):
            original = flat[index]
            flat[index] = original + eps
            plus = loss_and_gradients(spec, state, x, labels).loss
            flat[index] = original - eps
            minus = loss_and_gradients(spec, state, x, labels).loss
            flat[index] = original
            numeric = (plus - minus) / (2 * eps)
            error = abs(numeric - grad[index]) / (abs(grad[index]) + 1e-6)
            if error > worst:
                worst, where = error, f"{name}[{index}]"
    return worst, where


# Data parallelism: one SGD step on a global batch split evenly into `devices` shards.
BN_SEMANTICS = ("sync", "per_shard")  # global-batch statistics; each shard its own, gradients averaged
# What the running statistics become under per_shard (under sync every replica agrees):
# rank0: replica 0's everywhere (PyTorch DDP's broadcast_buffers); mean: the replicas' mean
# (TF's ON_READ variables with MEAN aggregation, JAX pmean); per_device: each replica keeps
# its own (MXNet, one copy per context), and a checkpoint holds replica 0's.
RUNNING_STATS_RULES = ("rank0", "mean", "per_device")


class DataParallelStep(NamedTuple):
    state: dict  # the new state as replica 0 (and a checkpoint) sees it, float64
    loss: float  # mean loss over the global batch
    replica_running_stats: list  # one dict of running statistics per replica


def split_batch(x, devices: int) -> list:
    """The global batch's `devices` contiguous, equal shards along the first axis."""
    if devices < 1 or len(x) % devices:
        raise ValueError(
            f"a batch of {len(x)} does not split evenly over {devices} device(s); "
            f"use a batch size divisible by {devices}"
        )
    return np.split(np.asarray(x), devices)


def _check_data_parallel_names(bn: str, running_stats: str) -> None:
    if bn not in BN_SEMANTICS:
        raise ValueError(f"bn must be one of {BN_SEMANTICS}, got {bn!r}")
    if running_stats not in RUNNING_STATS_RULES:
        raise ValueError(f"running_stats must be one of {RUNNING_STATS_RULES}, got {running_stats!r}")


def _running_only(state) -> dict:
    return {key: np.asarray(value, np.float64) for key, value in state.items() if is_running_stat(key)}


def _reconcile(replicas: list, rule: str) -> list:
    """The replicas' running statistics after a per-shard step, under `rule`."""
    if rule == "rank0":
        return [replicas[0]] * len(replicas)
    if rule == "mean":
        mean = {key: np.mean([replica[key] for replica in replicas], axis=0) for key in replicas[0]}
        return [mean] * len(replicas)
    return replicas


def data_parallel_sgd_step(
    spec,
    state,
    x,
    labels,
    lr: float,
    devices: int,
    bn: str = "sync",
    running_stats: str = "rank0",
    running_var: str = "unbiased",
    momentum: float = BN_MOMENTUM,
    replica_running_stats: list | None = None,
    dtype=np.float64,
) -> DataParallelStep:
    """One plain SGD step of data-parallel training on `devices` devices.

    bn "sync": BatchNorm uses the global batch's statistics, so the step is the one-device
    step on the whole batch. bn "per_shard": each shard is normalised with its own
    statistics and the shards' gradients are averaged; the running statistics follow
    `running_stats`. `replica_running_stats` carries each replica's statistics from a
    previous step (default: the state's, on every replica). `dtype` float32 runs the passes in
    float32 (loss_and_gradients) and rounds the new state to float32, as a float32 step does."""
    _check_data_parallel_names(bn, running_stats)
    x_shards, y_shards = split_batch(x, devices), split_batch(labels, devices)
    replicas = replica_running_stats or [_running_only(state)] * devices
    if bn == "sync":
        result = loss_and_gradients(spec, {**state, **replicas[0]}, x, labels, running_var, dtype)
        grads, loss = result.grads, result.loss
        replicas = [update_running_stats(replicas[0], result.batch_stats, running_var, momentum)] * devices
    else:
        passes = [loss_and_gradients(spec, state, xs, ys, running_var, dtype) for xs, ys in zip(x_shards, y_shards)]
        grads = {key: np.mean([p.grads[key] for p in passes], axis=0) for key in passes[0].grads}
        loss = float(np.mean([p.loss for p in passes]))
        replicas = _reconcile(
            [
                update_running_stats(replica, p.batch_stats, running_var, momentum)
                for replica, p in zip(replicas, passes)
            ],
            running_stats,
        )
    new_state = {
        key: np.asarray(np.asarray(replicas[0][key], dtype), np.float64)
        if is_running_stat(key)
        else np.asarray(np.asarray(value, dtype) - np.asarray(lr, dtype) * np.asarray(grads[key], dtype), np.float64)
        for key, value in state.items()
    }
    return DataParallelStep(new_state, loss, replicas)


def data_parallel_train(
    spec,
    state,
    batches,
    lr: float,
    devices: int,
    bn: str = "sync",
    running_stats: str = "rank0",
    running_var: str = "unbiased",
    momentum: float = BN_MOMENTUM,
    dtype=np.float64,
) -> tuple[dict, list[float]]:
    """`data_parallel_sgd_step` over (x, labels) `batches` in turn: the final state (replica
    0's view) and every step's loss."""
    losses, replicas = [], None
    for x, labels in batches:
        step = data_parallel_sgd_step(
            spec, state, x, labels, lr, devices, bn, running_stats, running_var, momentum, replicas, dtype
        )
        state, replicas = step.state, step.replica_running_stats
        losses.append(step.loss)
    return state, losses
