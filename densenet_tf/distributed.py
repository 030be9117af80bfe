"""Data-parallel training in TensorFlow/Keras 3: tf.distribute.MirroredStrategy.

The strategy keeps one copy of every variable per device (MirroredVariables) and
`strategy.run` steps each copy on its shard of the global batch; the optimizer all-reduces
the gradients with a SUM, so each replica's shard-mean loss is scaled by 1/replicas.
BatchNorm normalises each shard with the shard's own statistics, unless its layers are
`synchronized` (Keras all-reduces the sums and squared sums of the global batch). Keras 3
creates the running statistics with aggregation "none" (Keras 2 averaged them), so each
replica's copy keeps its own shard's update and reading the variable gives replica 0's; the
trainer starts every step from those (measured: the reference's "rank0" rule, not "mean").
CPU devices are simulated as logical devices, configured before TensorFlow initialises.

Variables are mirrored only when created under `strategy.scope()`, and the backend builds the
model outside it: the trainer builds its replicas under the scope from the model's config,
and copies the model's variables in before every step and replica 0's out after it.

Across processes (`train --nodes N`) the strategy is MultiWorkerMirroredStrategy: each
process is a worker named in TF_CONFIG (set by join_cluster), one replica per worker on the
CPU, and the same trainer runs on it: the replicas' ids, and so their shards, are global.
Keras 3's `fit` fails under this strategy (keras-team/keras#20585); the trainer's own
`strategy.run` loop does not use it.
"""

import functools
import json
import os

import tensorflow as tf
from keras import layers, ops

from conformance.engines import (
    COLLECTIVE_TIMEOUT_S,
    ENGINES,
    JOIN_TIMEOUT_S,
    bounded_wait,
    check_semantics,
    even_part,
    peers_guarded,
)

from .train import Trainer, compiled, float32_mode, gradient_step, to_tensors

# The engine, its BatchNorm semantics and running statistics (rank0: every step starts from
# replica 0's, see pull), as documented.
DECLARED = ENGINES["tf"]
DTYPES = {"sync": ("float32", "float64"), "per_shard": ("float32", "float64")}


JOINED = []  # the cluster this process joined (join_cluster), if any


def simulate_devices(n):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)


def join_cluster(cluster):
    """This process as worker `node_rank` of TF_CONFIG's cluster (every node's address,
    conformance.engines.Cluster.workers), and the MultiWorkerMirroredStrategy made now:
    it configures TensorFlow's collectives, which it must do before TensorFlow initialises."""
    if cluster.devices > 1 and not tf.config.list_physical_devices("GPU"):
        raise ValueError(
            "MultiWorkerMirroredStrategy runs one replica per worker on the CPU: use --devices 1 with --nodes"
        )
    config = {"cluster": {"worker": list(cluster.workers)}, "task": {"type": "worker", "index": cluster.node_rank}}
    os.environ["TF_CONFIG"] = json.dumps(config)
    JOINED.append(cluster)
    # Making the strategy waits for every worker to register with worker 0's coordination
    # service (seen waiting over 10 minutes), holding Python's lock: bounded to JOIN_TIMEOUT_S.
    with bounded_wait(JOIN_TIMEOUT_S, "the other TensorFlow workers did not all come", holds_lock=True):
        multi_worker_strategy()


@functools.cache  # one per process, made by join_cluster
def multi_worker_strategy():
    """MultiWorkerMirroredStrategy from TF_CONFIG; a collective whose peer stopped answering
    fails after COLLECTIVE_TIMEOUT_S (ring all-reduce over gRPC)."""
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING,
        timeout_seconds=COLLECTIVE_TIMEOUT_S,
    )
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def peer_lost(error):
    """Whether a step failed because a peer is gone: a collective that lost its connection,
    was aborted by the strategy's health check, or timed out."""
    return isinstance(error, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError))


def lost_cause(error):
    """The line of a failed step's error that says why (its first is "Graph execution error:")."""
    lines = [line.strip() for line in str(error).splitlines()]
    return next((line for line in lines if "aborted by" in line or "Deadline" in line), lines[0])


@functools.cache  # one per process: strategies made later would reuse the first one's collective keys
def mirrored_strategy(devices, device_type):
    if JOINED:  # a worker of several processes
        strategy = multi_worker_strategy()
        if strategy.num_replicas_in_sync != devices:
            raise ValueError(f"{devices} devices asked for, but the cluster has {strategy.num_replicas_in_sync}")
        return strategy
    available = tf.config.list_logical_devices(device_type.upper())
    if len(available) < devices:
        raise ValueError(
            f"{devices} devices asked for, but TensorFlow sees {len(available)} {device_type} device(s); "
            f"on the CPU simulate them in a fresh process (conformance.engines.prepare)"
        )
    return tf.distribute.MirroredStrategy([device.name for device in available[:devices]])


def replicate(model, sync_bn):
    """A model like `model` (the same config, so the same variable paths), built in the current
    scope; its BatchNorm layers synchronised over the replicas with `sync_bn`."""
    replica = model.__class__.from_config(model.get_config())
    for layer in replica._flatten_layers(include_self=False, recursive=True):  # Keras has no public walk
        if isinstance(layer, layers.BatchNormalization):
            layer.synchronized = sync_bn  # read when the step is traced
    return replica


class DataParallelTrainer(Trainer):
    """The single-device Trainer on a replica of the model mirrored over `devices` devices;
    each step's global batch is split evenly over them."""

    def __init__(self, model, lr, momentum=0.0, precision="fp32", devices=2, sync_bn=False, device_type="cpu"):
        self.bn_semantics = check_semantics(DECLARED.bn_semantics, device_type, sync_bn, "tf")
        self.devices, self.running_stats, self.engine = devices, DECLARED.running_stats, DECLARED.engine
        self.strategy, self.source = mirrored_strategy(devices, device_type), model
        self.rank = JOINED[0].node_rank if JOINED else 0
        with self.strategy.scope():  # the replicas' and the optimizer's variables are mirrored
            super().__init__(replicate(model, self.bn_semantics == "sync"), lr, momentum, precision)
        self.compiled_train_step = compiled(self.distributed_step)
        self.compiled_gather_step = compiled(self.distributed_gather_step)

    def pull(self):
        """The model's variables into every replica (weights may have been loaded since, and the
        replicas' running statistics differ after a per-shard step)."""
        for replica, source in zip(self.model.variables, self.source.variables):
            replica.assign(source.value)

    def push(self):
        """Replica 0's variables into the model (a MirroredVariable reads as replica 0's copy)."""
        for replica, source in zip(self.model.variables, self.source.variables):
            source.assign(replica.value)

    def step(self, X, y):
        """One replica's step on its shard."""
        logits, loss, grads = gradient_step(self.model, ops.cast(X, self.model.compute_dtype), y)
        # apply_gradients sums the replicas' gradients: scaled by 1/replicas, the sum is their mean.
        grads = [grad / self.strategy.num_replicas_in_sync for grad in grads]
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        return loss, ops.sum(ops.cast(ops.argmax(logits, axis=-1) == y, "int32"))

    def run(self, replica_step, *args):
        self.pull()
        loss, correct = self.strategy.run(replica_step, args=args)
        self.push()
        return (
            self.strategy.reduce(tf.distribute.ReduceOp.MEAN, loss, axis=None),
            self.strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None),
        )

    def distributed_step(self, X, y):
        return self.run(self.step, X, y)

    def distributed_gather_step(self, images, labels, indices):
        return self.run(self.gather_step, images, labels, indices)

    def shard(self, batch):
        """A global batch as per-replica values: its first axis split evenly, in order."""
        size = len(batch) // self.devices

        def replica_shard(context):
            start = context.replica_id_in_sync_group * size
            return batch[start : start + size]

        return self.strategy.experimental_distribute_values_from_function(replica_shard)

    def train_step(self, x, y):
        if len(x) % self.devices:
            raise ValueError(f"a batch of {len(x)} does not split evenly over {self.devices} devices")
        X, y = to_tensors(x, y)
        with float32_mode(self.precision):
            loss, correct = self.compiled_train_step(self.shard(X), self.shard(y))
        return float(loss), int(correct)

    def step_on(self, indices):
        indices = tf.convert_to_tensor(even_part(indices, self.devices))
        with float32_mode(self.precision), peers_guarded(peer_lost, self.rank, lost_cause):
            loss, correct = self.compiled_gather_step(self.images, self.labels, self.shard(indices))
        self.record_step(loss, correct, len(indices))

    def fetch(self, values):
        with peers_guarded(peer_lost, self.rank, lost_cause):  # where a step's failure may surface
            return super().fetch(values)

    def wait(self):
        with peers_guarded(peer_lost, self.rank, lost_cause):  # where it may surface first
            super().wait()

    def predict(self, x):
        self.pull()
        return super().predict(x)


def make_trainer(backend, model, lr, momentum=0.0, precision="fp32", devices=2, sync_bn=False):
    return DataParallelTrainer(model, lr, momentum, precision, devices, sync_bn, backend.device)
