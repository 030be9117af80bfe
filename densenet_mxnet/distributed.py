"""Data-parallel training in MXNet Gluon: one replica per context, gradients summed by the kvstore.

The parameters live on every context (`reset_ctx`); each context runs the forward and
backward pass on its shard of the global batch, and `gluon.Trainer(kvstore="device")`
all-reduces the gradients before the same SGD update on every copy. So BatchNorm normalises
each shard with the shard's own statistics, and each context keeps its own running
statistics: a checkpoint holds context 0's. CPU devices are simply `mx.cpu(0)`, `mx.cpu(1)`, ...
`gluon.contrib.nn.SyncBatchNorm` (the global batch's statistics) runs only in MXNet's legacy
NDArray mode, and this DenseNet is written in its NumPy mode (`use_np`), so "sync" is not
offered. Across machines MXNet's kvstore is `dist_sync`, which this trainer does not wire
yet (docs/distributed.md).
"""

import mxnet as mx
from mxnet import autograd
from mxnet.util import use_np

from conformance.engines import ENGINES, check_semantics, even_part

from . import compat  # noqa: F401  (before mxnet)
from .train import Trainer, loss_fn, model_context

# The engine, its BatchNorm semantics (per_shard only: SyncBatchNorm is legacy-mode only, see
# above) and running statistics (per_device: context 0's copy is exported), as documented.
DECLARED = ENGINES["mxnet"]
DTYPES = {"per_shard": ("float32", "float64")}


def simulate_devices(n):
    """Nothing to do: MXNet's CPU contexts mx.cpu(0), mx.cpu(1), ... exist already."""


def join_cluster(cluster):
    """Not wired: several machines would train through the dist_sync kvstore (a scheduler, a
    server and the workers started with DMLC_* variables; docs/distributed.md)."""
    raise ValueError("mxnet has no multi-process training wired (--nodes); see docs/distributed.md")


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

    def __init__(self, model, lr, momentum=0.0, precision="fp32", devices=2, sync_bn=False):
        device_type = model_context(model).device_type
        self.bn_semantics = check_semantics(
            DECLARED.bn_semantics, "cpu" if device_type == "cpu" else "gpu", sync_bn, "mxnet"
        )
        self.devices, self.running_stats, self.engine = devices, DECLARED.running_stats, DECLARED.engine
        self.contexts = replica_contexts(devices, device_type)
        model.collect_params().reset_ctx(self.contexts)  # gluon.Trainer reads the contexts when made
        super().__init__(model, lr, momentum, precision)  # gluon.Trainer's default kvstore: "device"

    def step(self, X, y):
        """One SGD step on the global batch (X, y), a shard on each context; the loss and the
        correct count stay on context 0."""
        with autograd.record():
            outputs = [(self.model(X_r), y_r) for X_r, y_r in zip(shards(X, self.contexts), shards(y, self.contexts))]
            losses = [loss_fn(logits, y_r) for logits, y_r in outputs]
        autograd.backward(losses)
        self.trainer.step(len(y))  # the kvstore sums the shards' gradients; divided by the global batch
        first = self.contexts[0]
        loss = sum(loss_r.sum().as_in_context(first) for loss_r in losses) / len(y)
        correct = sum((logits.argmax(axis=1) == y_r).sum().as_in_context(first) for logits, y_r in outputs)
        return loss, correct

    def train_step(self, x, y):
        if len(x) % self.devices:
            raise ValueError(f"a batch of {len(x)} does not split evenly over {self.devices} devices")
        return super().train_step(x, y)

    def step_on(self, indices):
        super().step_on(even_part(indices, self.devices))

    def load_optimizer_state(self, state):
        super().load_optimizer_state(state)  # context 0's updater; every context has its own
        for updater in self.trainer._updaters[1:]:  # each moves the states to its context at its first update
            updater.set_states(self.updater.get_states(dump_optimizer=False))


@use_np
def make_trainer(backend, model, lr, momentum=0.0, precision="fp32", devices=2, sync_bn=False):
    return DataParallelTrainer(model, lr, momentum, precision, devices, sync_bn)
