"""Training and evaluation steps in JAX: optax.sgd and cross-entropy, compiled with jax.jit.

optax.sgd keeps trace = g + momentum * trace and steps by -lr * trace: PyTorch's momentum
convention, so its traces export as PyTorch's momentum buffers unchanged.
"""

from functools import partial
from typing import Any

import jax
import numpy as np
import optax
from flax.training import train_state

from conformance import backends

from .weights import from_canonical, to_canonical


def loss_fn(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def model_device(model):
    return next(iter(jax.tree.leaves(model.variables)[0].devices()))


def to_device(model, x, y=None):
    device = model_device(model)
    X = jax.device_put(x, device)
    return X if y is None else (X, jax.device_put(y, device))


@partial(jax.jit, static_argnums=0)
def eval_logits(apply_fn, variables, X):
    return apply_fn(variables, X, train=False)


@partial(jax.jit, static_argnums=0)
def train_logits(apply_fn, params, batch_stats, X, dropout_key):
    """Train-mode logits (BatchNorm on batch statistics) and the updated running statistics."""
    logits, updates = apply_fn({"params": params, "batch_stats": batch_stats}, X, train=True,
                               mutable=["batch_stats"], rngs={"dropout": dropout_key})
    return logits, updates["batch_stats"]


def loss_and_logits(apply_fn, params, batch_stats, X, y, dropout_key):
    logits, batch_stats = train_logits(apply_fn, params, batch_stats, X, dropout_key)
    return loss_fn(logits, y), (logits, batch_stats)


grad_fn = jax.value_and_grad(loss_and_logits, argnums=1, has_aux=True)


@partial(jax.jit, static_argnums=0)
def compute_gradients(apply_fn, params, batch_stats, X, y, dropout_key):
    (loss, (_, batch_stats)), grads = grad_fn(apply_fn, params, batch_stats, X, y, dropout_key)
    return loss, grads, batch_stats


def loss_and_gradients(model, x, y, seed=0):
    """Train-mode loss and every parameter's gradient (BN running statistics update too)."""
    X, y = to_device(model, x, y)
    params, batch_stats = model.variables["params"], model.variables["batch_stats"]
    loss, grads, batch_stats = compute_gradients(model.module.apply, params, batch_stats, X, y, jax.random.key(seed))
    model.variables = {"params": params, "batch_stats": batch_stats}
    return float(loss), to_canonical(grads)


class TrainState(train_state.TrainState):
    """Flax's TrainState (params, optax state, step) plus BatchNorm's statistics and a dropout key."""

    batch_stats: Any
    dropout_key: jax.Array


@jax.jit
def train_step(state, X, y):
    dropout_key = jax.random.fold_in(state.dropout_key, state.step)
    (loss, (logits, batch_stats)), grads = grad_fn(state.apply_fn, state.params, state.batch_stats, X, y, dropout_key)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, loss, (logits.argmax(axis=-1) == y).sum()


class Trainer(backends.Trainer):
    def __init__(self, model, lr, momentum=0.0, seed=0):
        self.model = model
        state = TrainState.create(apply_fn=model.module.apply, params=model.variables["params"],
                                  tx=optax.sgd(lr, momentum or None), batch_stats=model.variables["batch_stats"],
                                  dropout_key=jax.random.key(seed))
        # device_put also makes the step counter an array: as a Python int, it would make the
        # second step compile again.
        self.state = jax.device_put(state, model_device(model))

    def train_step(self, x, y):
        X, y = to_device(self.model, x, y)
        # The model's variables are the truth: weights loaded into it between steps are used.
        state = self.state.replace(params=self.model.variables["params"], batch_stats=self.model.variables["batch_stats"])
        self.state, loss, correct = train_step(state, X, y)
        self.model.variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        return float(loss), int(correct)

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
