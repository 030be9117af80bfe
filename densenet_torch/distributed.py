"""Data-parallel training in PyTorch: DistributedDataParallel, one process per device.

torchrun starts one process per device (conformance.engines.LAUNCHERS); each holds a
replica and steps on its shard of the global batch, and DDP averages the gradients with an
all-reduce during backward (gloo on CPUs, NCCL on GPUs). So BatchNorm normalises each shard
with the shard's own statistics; `nn.SyncBatchNorm` uses the global batch's, but only on
CUDA (it refuses CPU modules and has no CPU kernel). DDP broadcasts rank 0's buffers at the
start of every forward, so the running statistics that count are rank 0's.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conformance.engines import COLLECTIVE_TIMEOUT_S, ENGINES, check_semantics, even_part, peers_guarded, shard_of

from .train import Trainer, model_device, to_device

# The engine, its BatchNorm semantics (SyncBatchNorm runs on CUDA only) and running statistics
# (rank0: broadcast_buffers=True starts every forward from rank 0's buffers), as documented.
DECLARED = ENGINES["torch"]
DTYPES = {"sync": ("float32", "float64"), "per_shard": ("float32", "float64")}
PROCESS_GROUP_BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


def simulate_devices(n):
    """Nothing to do: torchrun starts one process per device (conformance.engines.LAUNCHERS)."""


def join_cluster(cluster):
    """Nothing to do: each node's torchrun joined the others at the coordinator
    (conformance.engines.CLUSTER_LAUNCHERS); the processes find each other in join_process_group."""


def replica_device(device_type):
    """This process's device: the CPU, or the GPU numbered by torchrun's LOCAL_RANK."""
    if device_type == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"process {local_rank} of this machine needs GPU {local_rank}, but PyTorch sees "
            f"{torch.cuda.device_count()}; start at most one process per GPU (--nproc-per-node)"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def join_process_group(devices, device_type):
    """torchrun's process group (joined once per process); one process per device."""
    if "WORLD_SIZE" not in os.environ:
        raise ValueError(
            "PyTorch data parallelism runs one process per device: start it with torchrun "
            "(densenet-xf train --devices N does; see conformance.engines.LAUNCHERS)"
        )
    if not dist.is_initialized():
        dist.init_process_group(PROCESS_GROUP_BACKENDS[device_type], timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    if dist.get_world_size() != devices:
        raise ValueError(f"{devices} devices asked for, but torchrun started {dist.get_world_size()} processes")


def peer_lost(error):
    """Whether a collective failed because a peer is gone: gloo's closed or reset connection
    (a plain RuntimeError), or a collective that timed out (DistError)."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "/gloo/" in str(error))


class DataParallelTrainer(Trainer):
    """The single-device Trainer on this process's replica, its network wrapped in DDP; each
    step's global batch is split evenly over the processes and this one steps on its shard."""

    def __init__(self, model, lr, momentum=0.0, precision="fp32", devices=2, sync_bn=False):
        device_type = model_device(model).type
        self.bn_semantics = check_semantics(
            DECLARED.bn_semantics, "cpu" if device_type == "cpu" else "gpu", sync_bn, "torch"
        )
        self.devices, self.running_stats, self.engine = devices, DECLARED.running_stats, DECLARED.engine
        device = replica_device(device_type)
        join_process_group(devices, device_type)
        self.rank = dist.get_rank()
        if self.bn_semantics == "sync":  # in place: the same parameters and buffers, in SyncBatchNorm layers
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        super().__init__(model.to(device), lr, momentum, precision)
        self.net = DistributedDataParallel(self.net, device_ids=None if device_type == "cpu" else [device])

    def shard(self, batch):
        """This process's part of a global batch: its first axis split evenly."""
        return shard_of(batch, self.rank, self.devices)

    def global_sums(self, loss, correct):
        """The global batch's mean loss and correct count, from this shard's (one all-reduce)."""
        totals = torch.stack([loss, correct.to(loss.dtype)])
        dist.all_reduce(totals)
        return totals[0] / self.devices, totals[1]

    def train_step(self, x, y):
        if len(x) % self.devices:
            raise ValueError(f"a batch of {len(x)} does not split evenly over {self.devices} devices")
        loss, correct = self.global_sums(*self.step(*to_device(self.model, self.shard(x), self.shard(y))))
        return loss.item(), int(correct.item())

    def step_on(self, indices):
        with peers_guarded(peer_lost, self.rank):
            super().step_on(self.shard(even_part(indices, self.devices)))

    def record_step(self, loss, correct, size):
        super().record_step(*self.global_sums(loss, correct), size * self.devices)

    def wait(self):
        with peers_guarded(peer_lost, self.rank):
            super().wait()


def make_trainer(backend, model, lr, momentum=0.0, precision="fp32", devices=2, sync_bn=False):
    return DataParallelTrainer(model, lr, momentum, precision, devices, sync_bn)
