"""A backend whose memory-efficient model says its framework has no mechanism for it, for the
bench's memory section test: PyTorch, with the model marked as MXNet's may be."""

from conformance.bench.worker import NO_MECHANISM
from densenet_torch import backend as torch_backend


class Backend(torch_backend.Backend):
    name = "nomechanism"

    def build(self, spec, dtype="float32", memory_efficient=False):
        model = super().build(spec, dtype)
        if memory_efficient:
            setattr(model, NO_MECHANISM, "this framework cannot recompute (a test backend)")
        return model
