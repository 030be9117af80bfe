"""Training and evaluation steps in JAX: optax.sgd and cross-entropy, compiled with jax.jit.

optax.sgd keeps trace = g + momentum * trace and steps by -lr * trace: PyTorch's momentum
convention, so its traces export as PyTorch's momentum buffers unchanged.
"""

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from conformance import interface

from .weights import from_canonical, to_canonical


def loss_fn(logits, labels):
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # float32 under mixed precision
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def sgd(lr, momentum=0.0):
    """Stochastic gradient descent (momentum 0: plain SGD, as the chapter trains). An optax
    transformation holds no parameters: the train state applies it to them."""
    return optax.sgd(lr, momentum or None)


def model_device(model):
    return next(iter(jax.tree.leaves(model.variables)[0].devices()))


def to_device(model, x, y=None):
    device = model_device(model)
    X = jax.device_put(x, device)
    return X if y is None else (X, jax.device_put(y, device))


# nn.remat (memory_efficient=True) fences what it recomputes with optimization barriers; XLA's
# CPU compiler strips them before its CSE pass, which then merges the recomputation back into
# the forward pass and no memory is saved. Leaving that one pass out keeps the barriers; a
# program without barriers (the plain model) compiles as before. JAX takes compiler options only
# on the outermost jit: the training loop's gather_step and the checks' compute_gradients.
KEEP_REMAT = {"xla_disable_hlo_passes": "cse_barrier_expander"}


@partial(jax.jit, static_argnums=0)
def eval_logits(apply_fn, variables, X):
    return apply_fn(variables, X, train=False)


@partial(jax.jit, static_argnums=0)
def train_logits(apply_fn, params, batch_stats, X, dropout_key):
    """Train-mode logits (BatchNorm on batch statistics) and the updated running statistics."""
    logits, updates = apply_fn(
        {"params": params, "batch_stats": batch_stats},
        X,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": dropout_key},
    )
    return logits, updates["batch_stats"]


def loss_and_logits(apply_fn, params, batch_stats, X, y, dropout_key):
    logits, batch_stats = train_logits(apply_fn, params, batch_stats, X, dropout_key)
    return loss_fn(logits, y), (logits, batch_stats)


grad_fn = jax.value_and_grad(loss_and_logits, argnums=1, has_aux=True)


# The checks run this program a few times per model, so XLA's compile time is what it costs
# (over a minute for densenet121 on a CPU): LLVM optimisation level 0 halves that compile, and
# its code still runs densenet121 at batch 2 in under a second. Training steps keep the default.
@partial(jax.jit, static_argnums=0, compiler_options={**KEEP_REMAT, "xla_backend_optimization_level": 0})
def compute_gradients(apply_fn, params, batch_stats, X, y, dropout_key):
    (loss, (logits, batch_stats)), grads = grad_fn(apply_fn, params, batch_stats, X, y, dropout_key)
    return loss, logits, grads, batch_stats


def train_pass(model, x, y, seed=0):
    """Train-mode logits, loss and every parameter's gradient (canonical), from one compiled
    program (BN running statistics update too)."""
    X, y = to_device(model, x, y)
    params, batch_stats = model.variables["params"], model.variables["batch_stats"]
    loss, logits, grads, batch_stats = compute_gradients(
        model.module.apply, params, batch_stats, X, y, jax.random.key(seed)
    )
    model.variables = {"params": params, "batch_stats": batch_stats}
    return np.asarray(logits), float(loss), to_canonical(grads)


class TrainState(train_state.TrainState):
    """Flax's TrainState (params, optax state, step) plus BatchNorm's statistics and a dropout key."""

    batch_stats: Any
    dropout_key: jax.Array


# The old state's buffers are donated: XLA writes the new weights into them.
@partial(jax.jit, donate_argnums=0)
def train_step(state, X, y):
    dropout_key = jax.random.fold_in(state.dropout_key, state.step)
    (loss, (logits, batch_stats)), grads = grad_fn(state.apply_fn, state.params, state.batch_stats, X, y, dropout_key)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, loss, (logits.argmax(axis=-1) == y).sum()


@partial(jax.jit, donate_argnums=0, static_argnums=4, compiler_options=KEEP_REMAT)
def gather_step(state, images, labels, indices, dtype):
    """train_step on the examples `indices` of the device-resident set, made float there."""
    X = (images[indices].astype(jnp.promote_types(dtype, jnp.float32)) / 255)[..., None]  # float64 stays
    return train_step(state, X.astype(dtype), labels[indices])


def float32_mode(precision):
    """JAX's default matmul and convolution precision (TF32 or bfloat16 passes on GPUs) for
    precision tf32 and bf16, 'highest' for fp32: the backend keeps 'highest' for the checks."""
    return jax.default_matmul_precision("highest" if precision == "fp32" else "default")


class Trainer(interface.Trainer):
    layout = "NHWC"

    def __init__(self, model, lr, momentum=0.0, precision="fp32", compile=False, seed=0):
        self.model, self.precision = model, precision
        # Flax's mixed precision: the module computes in bfloat16, the parameters stay float32.
        module = model.module.clone(dtype=jnp.bfloat16) if precision == "bf16" else model.module
        self.dtype = module.dtype
        state = TrainState.create(
            apply_fn=module.apply,
            params=model.variables["params"],
            tx=sgd(lr, momentum),
            batch_stats=model.variables["batch_stats"],
            dropout_key=jax.random.key(seed),
        )
        # device_put also makes the step counter an array: as a Python int, it would make the
        # second step compile again.
        self.state = jax.device_put(state, model_device(model))
        on_gpu = model_device(model).platform == "gpu"
        self.arithmetic = interface.arithmetic_words(precision, on_gpu, "Flax dtype bfloat16, float32 parameters")

    def current_state(self):
        # The model's variables are the truth: weights loaded into it between steps are used.
        return self.state.replace(
            params=self.model.variables["params"], batch_stats=self.model.variables["batch_stats"]
        )

    def keep(self, state):
        self.state = state
        self.model.variables = {"params": state.params, "batch_stats": state.batch_stats}

    def train_step(self, x, y):
        X, y = to_device(self.model, x, y)
        with float32_mode(self.precision):
            state, loss, correct = train_step(self.current_state(), X.astype(self.dtype), y)
        self.keep(state)
        return float(loss), int(correct)

    def set_data(self, images, labels):
        self.images, self.labels = to_device(self.model, images, labels)  # uint8: a quarter of float32
        self.reset_sums()

    def step_on(self, indices):
        with float32_mode(self.precision):
            state, loss, correct = gather_step(
                self.current_state(),
                self.images,
                self.labels,
                jax.device_put(indices, model_device(self.model)),
                self.dtype,
            )
        self.keep(state)
        self.record_step(loss, correct, len(indices))

    def fetch(self, values):
        return np.asarray(jax.device_get(values))  # jnp.stack would compile anew for each count

    def activation_bytes(self, indices):
        """The compiled step's temporary memory (XLA's memory_analysis), activations included."""
        device = model_device(self.model)
        args = self.current_state(), self.images, self.labels, jax.device_put(indices, device), self.dtype
        compiled = gather_step.lower(*args).compile()
        return int(compiled.memory_analysis().temp_size_in_bytes), "the compiled step's temporary memory (XLA)"

    def wait(self):
        jax.block_until_ready(self.state)

    def predict(self, x):
        return np.asarray(eval_logits(self.model.module.apply, self.model.variables, to_device(self.model, x)))

    def momentum_buffers(self):
        return optax.tree_utils.tree_get(self.state.opt_state, "trace")  # None without momentum

    def export_optimizer_state(self):
        trace = self.momentum_buffers()
        return {} if trace is None else to_canonical(trace)

    def load_optimizer_state(self, state):
        trace = self.momentum_buffers()
        if trace is not None:
            trace = jax.device_put(from_canonical(state, trace), model_device(self.model))
            self.state = self.state.replace(opt_state=optax.tree_utils.tree_set(self.state.opt_state, trace=trace))
