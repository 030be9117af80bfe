"""Data-parallel training in MXNet Gluon: one replica per context, gradients summed by the kvstore.

The parameters live on every context (`reset_ctx`); each context runs the forward and
backward pass on its shard of the global batch, and `gluon.Trainer(kvstore="device")`
all-reduces the gradients before the same SGD update on every copy. So BatchNorm normalises
each shard with the shard's own statistics, and each context keeps its own running
statistics: a checkpoint holds context 0's. CPU devices are simply `mx.cpu(0)`, `mx.cpu(1)`, ...
`gluon.contrib.nn.SyncBatchNorm` (the global batch's statistics) runs only in MXNet's legacy
NDArray mode, and this DenseNet is written in its NumPy mode (`use_np`), so "sync" is not
offered.

Across processes (`train --nodes N`) the kvstore is `dist_sync`, MXNet's parameter server
(ps-lite): every node's worker pushes its contexts' summed gradients to the server, which
adds the workers' pushes of a step and answers each pull with the sum; each worker then
updates its own copy (update_on_kvstore=False keeps the optimizer state in the worker, as on
one machine). ps-lite numbers the workers in the order they reach the scheduler: that
number is the process's global rank. ps-lite never fails a call whose peer is gone (its
heartbeats are recorded, not acted on, and PS_RESEND only resends to a server that is still
there), so every step's wait for the other workers is bounded by the trainer itself
(conformance.engines.bounded_wait).
"""

import atexit
import contextlib
import functools
import os

import mxnet as mx
from mxnet import autograd, gluon, np
from mxnet.util import use_np

from conformance.engines import (
    COLLECTIVE_TIMEOUT_S,
    ENGINES,
    JOIN_TIMEOUT_S,
    bounded_wait,
    check_semantics,
    even_part,
    shard_of,
)

from . import compat  # noqa: F401  (before mxnet)
from .train import Trainer, loss_fn, model_context
from .weights import trainable_params

# The engine, its BatchNorm semantics (per_shard only: SyncBatchNorm is legacy-mode only, see
# above) and running statistics (per_device: context 0's copy is exported), as documented.
DECLARED = ENGINES["mxnet"]
DTYPES = {"per_shard": ("float32", "float64")}


def simulate_devices(n):
    """Nothing to do: MXNet's CPU contexts mx.cpu(0), mx.cpu(1), ... exist already."""


def join_cluster(cluster):
    """Join the dist_sync kvstore as a worker (conformance.engines.launch set the DMLC_*
    variables, and node 0 runs the scheduler and the server): at most JOIN_TIMEOUT_S for the
    scheduler and the other workers. The kvstore's worker number becomes this process's
    global rank (RANK: the process that writes, and its part of each batch)."""
    with bounded_wait(JOIN_TIMEOUT_S, "the dist_sync kvstore's scheduler and the other workers did not all come"):
        kvstore = cluster_kvstore()
    os.environ["RANK"] = str(kvstore.rank)
    atexit.register(leave_cluster, kvstore)


@functools.cache  # one per process: the trainer takes the one join_cluster made
def cluster_kvstore():
    return mx.kv.create("dist_sync")


def leave_cluster(kvstore):
    """At exit, wait (bounded) until every worker is done: the kvstore's own shutdown that
    follows waits for all of them without a limit."""
    with bounded_wait(COLLECTIVE_TIMEOUT_S, "the other workers did not reach the end of the run"):
        kvstore._barrier()  # MXNet 1.x names its barrier with an underscore; it is the documented one


def replica_contexts(devices, device_type):
    """`devices` contexts of the model's device kind: CPU contexts, or the first GPUs."""
    if device_type == "gpu" and mx.context.num_gpus() < devices:
        raise ValueError(f"{devices} devices asked for, but MXNet sees {mx.context.num_gpus()} GPU(s)")
    return [mx.Context(device_type, i) for i in range(devices)]


@use_np
def shards(array, contexts):
    """A global batch's contiguous, equal shards, one on each context (`split_and_load`
    fails in NumPy mode under NumPy 2, so the slicing is by hand)."""
    size = len(array) // len(contexts)
    return [array[r * size : (r + 1) * size].as_in_context(ctx) for r, ctx in enumerate(contexts)]


@use_np
class DataParallelTrainer(Trainer):
    """The single-device Trainer with its parameters on `devices` contexts; each step's global
    batch is split evenly over them and the kvstore sums the gradients."""

    def __init__(self, model, lr, momentum=0.0, precision="fp32", devices=2, sync_bn=False, kvstore=None):
        device_type = model_context(model).device_type
        self.bn_semantics = check_semantics(
            DECLARED.bn_semantics, "cpu" if device_type == "cpu" else "gpu", sync_bn, "mxnet"
        )
        self.devices, self.running_stats, self.engine = devices, DECLARED.running_stats, DECLARED.engine
        self.kvstore = kvstore  # dist_sync across processes; None: one process
        self.processes, self.rank = (kvstore.num_workers, kvstore.rank) if kvstore else (1, 0)
        if devices % self.processes:
            raise ValueError(f"{devices} devices do not split evenly over {self.processes} processes")
        self.contexts = replica_contexts(devices // self.processes, device_type)
        model.collect_params().reset_ctx(self.contexts)  # gluon.Trainer reads the contexts when made
        super().__init__(model, lr, momentum, precision)  # gluon.Trainer's default kvstore: "device"
        if kvstore:
            self.trainer = cluster_sgd(model, lr, momentum, kvstore)
            self.sums_key = len(self.names)  # a key of its own, past the trainer's parameter indices

    def step(self, X, y):
        """One SGD step on this process's part (X, y) of the global batch, a shard on each
        context; the global batch's loss and correct count stay on context 0."""
        with autograd.record():
            outputs = [(self.model(X_r), y_r) for X_r, y_r in zip(shards(X, self.contexts), shards(y, self.contexts))]
            losses = [loss_fn(logits, y_r) for logits, y_r in outputs]
        autograd.backward(losses)
        self.trainer.step(len(y) * self.processes)  # the kvstore sums the shards' gradients; / the global batch
        first = self.contexts[0]
        loss = sum(loss_r.sum().as_in_context(first) for loss_r in losses) / len(y)
        correct = sum((logits.argmax(axis=1) == y_r).sum().as_in_context(first) for logits, y_r in outputs)
        return self.global_sums(loss, correct)

    def global_sums(self, loss, correct):
        """The global batch's mean loss and correct count, from this process's (through the kvstore)."""
        if not self.kvstore:
            return loss, correct
        totals = np.stack([loss, correct.astype(loss.dtype)])
        if not getattr(self, "sums_ready", False):
            self.kvstore.init(self.sums_key, np.zeros_like(totals))
            self.sums_ready = True
        self.kvstore.pushpull(self.sums_key, totals, out=totals)
        totals.wait_to_read()  # a step at a time: the wait that peers_bounded limits
        return totals[0] / self.processes, totals[1].astype(correct.dtype)

    def peers_bounded(self):
        """A step's wait for the other processes, bounded (ps-lite would wait for a lost one forever)."""
        if not self.kvstore:
            return contextlib.nullcontext()
        return bounded_wait(COLLECTIVE_TIMEOUT_S, "the dist_sync kvstore's step did not complete")

    def train_step(self, x, y):
        if len(x) % self.devices:
            raise ValueError(f"a batch of {len(x)} does not split evenly over {self.devices} devices")
        with self.peers_bounded():
            return super().train_step(shard_of(x, self.rank, self.processes), shard_of(y, self.rank, self.processes))

    def step_on(self, indices):
        with self.peers_bounded():
            super().step_on(shard_of(even_part(indices, self.devices), self.rank, self.processes))

    def record_step(self, loss, correct, size):
        super().record_step(loss, correct, size * self.processes)  # the global batch's

    def load_optimizer_state(self, state):
        super().load_optimizer_state(state)  # context 0's updater; every context has its own
        for updater in self.trainer._updaters[1:]:  # each moves the states to its context at its first update
            updater.set_states(self.updater.get_states(dump_optimizer=False))


def cluster_sgd(model, lr, momentum, kvstore):
    """train.sgd's trainer, its gradients summed across processes by `kvstore` (dist_sync)."""
    params = list(trainable_params(model).values())
    return gluon.Trainer(
        params, "sgd", {"learning_rate": lr, "momentum": momentum}, kvstore=kvstore, update_on_kvstore=False
    )


@use_np
def make_trainer(backend, model, lr, momentum=0.0, precision="fp32", devices=2, sync_bn=False):
    kvstore = cluster_kvstore() if "DMLC_ROLE" in os.environ else None  # joined in join_cluster
    return DataParallelTrainer(model, lr, momentum, precision, devices, sync_bn, kvstore)
