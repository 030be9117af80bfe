"""Data-parallel training in JAX: the global batch sharded over a device mesh.

Synchronised BatchNorm needs no code: under `jax.jit` a batch sharded on its first axis is
still one global array, so BatchNorm's mean and variance are the global batch's (XLA inserts
the all-reduces). Per-shard BatchNorm is what `jax.shard_map` computes: each device runs the
step on its shard, the shards' mean losses are averaged with `pmean` (so their gradients
are too) and the running statistics are averaged. CPU devices are simulated with
`jax_num_cpu_devices`, which must be set before JAX first touches a device.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conformance.engines import (
    ENGINES,
    HEARTBEAT_TIMEOUT_S,
    JOIN_TIMEOUT_S,
    check_semantics,
    even_part,
    peers_guarded,
    shard_of,
)

from .train import Trainer, eval_logits, float32_mode, loss_and_logits, train_step

# The engine, its BatchNorm semantics and running statistics (mean: per-shard statistics are
# pmean-ed), as documented.
DECLARED = ENGINES["jax"]
DTYPES = {"sync": ("float32", "float64"), "per_shard": ("float32", "float64")}
AXIS = "data"


def simulate_devices(n):
    jax.config.update("jax_num_cpu_devices", n)


def join_cluster(cluster):
    """Join the other nodes' processes at the coordinator (node 0 hosts JAX's coordination
    service there), with CPU collectives over gloo; before JAX first touches a device."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        cluster.coordinator,
        cluster.nodes,
        cluster.node_rank,
        initialization_timeout=JOIN_TIMEOUT_S,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
    )


def peer_lost(error):
    """Whether a computation failed because a peer is gone: gloo's closed connection, or the
    coordination service's missed heartbeats."""
    return isinstance(error, jax.errors.JaxRuntimeError) and any(
        word in str(error) for word in ("Gloo", "gloo", "heartbeat")
    )


def data_mesh(devices, platform):
    available = jax.devices(platform)
    if len(available) < devices:
        raise ValueError(
            f"{devices} devices asked for, but JAX sees {len(available)} {platform} device(s); on the CPU "
            f"simulate them in a fresh process (conformance.engines.prepare)"
        )
    # Auto axes: jit places the computation (Explicit axes, make_mesh's default, type the shardings).
    return jax.make_mesh((devices,), (AXIS,), (jax.sharding.AxisType.Auto,), devices=available[:devices])


def shard_loss_and_logits(apply_fn, params, batch_stats, X, y, dropout_key):
    loss, (logits, batch_stats) = loss_and_logits(apply_fn, params, batch_stats, X, y, dropout_key)
    # The mean of the shards' losses: its gradient is the mean of their gradients.
    return jax.lax.pmean(loss, AXIS), (logits, jax.lax.pmean(batch_stats, AXIS))


shard_grad_fn = jax.value_and_grad(shard_loss_and_logits, argnums=1, has_aux=True)


def shard_step(state, X, y):
    """train_step on one device's shard, BatchNorm on the shard's statistics."""
    dropout_key = jax.random.fold_in(jax.random.fold_in(state.dropout_key, state.step), jax.lax.axis_index(AXIS))
    (loss, (logits, batch_stats)), grads = shard_grad_fn(
        state.apply_fn, state.params, state.batch_stats, X, y, dropout_key
    )
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, loss, jax.lax.psum((logits.argmax(axis=-1) == y).sum(), AXIS)


def per_shard_step(mesh):
    return jax.jit(
        jax.shard_map(shard_step, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=P()), donate_argnums=0
    )


@partial(jax.jit, donate_argnums=0, static_argnums=(4, 5))
def gather_step(state, images, labels, indices, dtype, step):
    """`step` on the examples `indices` of the device-resident set, made float there."""
    X = (images[indices].astype(jnp.float32) / 255)[..., None]
    return step(state, X.astype(dtype), labels[indices])


class DataParallelTrainer(Trainer):
    """The single-device Trainer's state, replicated over `devices` devices; each step's
    global batch is split evenly over them."""

    def __init__(self, model, lr, momentum=0.0, precision="fp32", devices=2, sync_bn=False, platform="cpu"):
        self.bn_semantics = check_semantics(DECLARED.bn_semantics, platform, sync_bn, "jax")
        self.devices, self.running_stats, self.engine = devices, DECLARED.running_stats, DECLARED.engine
        mesh = data_mesh(devices, platform)
        self.replicated, self.batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
        self.step = train_step if self.bn_semantics == "sync" else per_shard_step(mesh)
        super().__init__(model, lr, momentum, precision)
        self.keep(self.replicate(self.state))

    def replicate(self, tree):
        """`tree` on every device of the mesh. Over several processes each builds its own
        devices' copies from the value it holds (the same in every process)."""
        if jax.process_count() == 1:
            return jax.device_put(tree, self.replicated)

        def one(value):
            if isinstance(value, jax.Array) and value.sharding.is_equivalent_to(self.replicated, value.ndim):
                return value
            if jax.dtypes.issubdtype(getattr(value, "dtype", None), jax.dtypes.prng_key):  # a typed key: its data
                return jax.random.wrap_key_data(one(jax.random.key_data(value)), impl=jax.random.key_impl(value))
            host = np.asarray(value)
            return jax.make_array_from_callback(host.shape, self.replicated, lambda index: host[index])

        return jax.tree.map(one, tree)

    def current_state(self):
        return self.replicate(super().current_state())  # weights loaded since: replicate them

    def shard(self, x):
        """The global batch `x` as one array sharded over the mesh, built from this process's
        part of it (all of it, in one process)."""
        x = np.asarray(x)
        local = shard_of(x, jax.process_index(), jax.process_count())
        return jax.make_array_from_process_local_data(self.batch_sharding, local, x.shape)

    def train_step(self, x, y):
        if len(x) % self.devices:
            raise ValueError(f"a batch of {len(x)} does not split evenly over {self.devices} devices")
        with float32_mode(self.precision):
            state, loss, correct = self.step(
                self.current_state(), self.shard(np.asarray(x).astype(self.dtype)), self.shard(y)
            )
        self.keep(state)
        return float(loss), int(correct)

    def set_data(self, images, labels):
        self.images, self.labels = self.replicate((images, labels))
        self.reset_sums()

    def step_on(self, indices):
        indices = even_part(indices, self.devices)
        with float32_mode(self.precision), peers_guarded(peer_lost, jax.process_index()):
            state, loss, correct = gather_step(
                self.current_state(), self.images, self.labels, self.shard(indices), self.dtype, self.step
            )
        self.keep(state)
        self.record_step(loss, correct, len(indices))

    def fetch(self, values):
        with peers_guarded(peer_lost, jax.process_index()):  # where a step's failure surfaces
            return super().fetch(values)

    def wait(self):
        with peers_guarded(peer_lost, jax.process_index()):  # where it surfaces first
            super().wait()

    def predict(self, x):
        return np.asarray(eval_logits(self.model.module.apply, self.model.variables, self.replicate(x)))

    def load_optimizer_state(self, state):
        super().load_optimizer_state(state)
        self.state = self.replicate(self.state)  # the model's variables stay the weights


def make_trainer(backend, model, lr, momentum=0.0, precision="fp32", devices=2, sync_bn=False):
    return DataParallelTrainer(model, lr, momentum, precision, devices, sync_bn, backend.device.platform)
