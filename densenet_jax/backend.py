"""The JAX/Flax backend as the conformance suite sees it: NumPy in, NumPy out."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from conformance import interface
from conformance.files import cache_dir
from conformance.specs import channel_plan, get_spec
from conformance.weights import init_state

from .model import DenseBlock, DenseNet, Model, TransitionBlock
from .train import Trainer, eval_logits, to_device, train_pass
from .weights import export_canonical, load_canonical


def is_stage(module, method_name):
    return isinstance(module, (DenseBlock, TransitionBlock))


def stage_output(sown):
    """The stem's output is sown as a tuple; a captured module's output sits under '__call__'."""
    return (sown["__call__"] if isinstance(sown, dict) else sown)[0]


def first_gpu():
    try:
        return jax.local_devices(backend="gpu")[0]  # this process's, when several run
    except RuntimeError:  # no GPU backend in this jaxlib, or no device
        return None


class Backend(interface.BackendBase):
    name = "jax"
    layout = "NHWC"
    running_var = "biased"  # Flax's BatchNorm folds the biased batch variance into `var`

    def __init__(self, device="cpu"):
        super().__init__(device)
        # Numeric checks need full float32: on a GPU, JAX's default precision runs matmuls and
        # convolutions in TF32 or bfloat16. A trainer with another precision uses the default
        # for its own steps only.
        jax.config.update("jax_default_matmul_precision", "highest")
        # XLA takes tens of seconds to compile a 100-layer DenseNet on a CPU: keep what it
        # compiles in JAX's persistent cache for the next process, unless the user chose a place.
        if not jax.config.jax_compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax"))
        gpu = first_gpu() if device == "gpu" else None
        if device == "gpu" and gpu is None:
            self.device_note = f"JAX sees no GPU (backend {jax.default_backend()!r}); ran on the CPU"
        self.device = gpu or jax.local_devices(backend="cpu")[0]

    @property
    def device_name(self):
        device = self.device
        return "cpu" if device.platform == "cpu" else f"{device.platform}:{device.id} {device.device_kind}"

    def build(self, spec, dtype="float32", memory_efficient=False):
        if dtype == "float64" and not jax.config.jax_enable_x64:
            # without it JAX silently computes float64 in float32; inside dtype_scope it is on already
            jax.config.update("jax_enable_x64", True)
        module = DenseNet(get_spec(spec), jnp.dtype(dtype), memory_efficient)
        # Flax's module.init would compile and run the whole network to draw initial weights
        # (minutes for the large nets on a CPU); the canonical NumPy ones need neither.
        model = Model(module, {})
        self.load_state(model, init_state(module.spec))
        return model

    def dtype_scope(self, dtype):
        # 64-bit types on for float64 only: with them on, a float32 program's integer arrays
        # (indices, labels) turn int64, and a Python float in a float32 expression could promote.
        return jax.enable_x64(dtype == "float64")

    def load_state(self, model, state):
        model.variables = jax.device_put(load_canonical(model.module, state), self.device)

    def export_state(self, model):
        return export_canonical(model.variables)

    def count_params(self, model):
        sizes = {
            collection: sum(leaf.size for leaf in jax.tree.leaves(tree)) for collection, tree in model.variables.items()
        }
        return sizes["params"], sizes["batch_stats"]

    def stage_shapes(self, model, x):
        # eval_shape traces the model on abstract values: every shape, no arithmetic.
        apply = partial(model.module.apply, train=False, mutable=["intermediates"], capture_intermediates=is_stage)
        logits, state = jax.eval_shape(apply, model.variables, x)
        sown = state["intermediates"]  # a pytree: its keys come back sorted, so take them in network order
        stages = channel_plan(get_spec(model.module.spec))
        shapes = {stage.name: stage_output(sown[stage.name]).shape for stage in stages}
        return {**shapes, "logits": logits.shape}

    def forward(self, model, x, train):
        if not train:
            return np.asarray(eval_logits(model.module.apply, model.variables, to_device(model, x)))
        # The gradients' program, which XLA compiles once for both (labels do not change logits).
        return train_pass(model, x, np.zeros(len(x), np.int64))[0]

    def train_pass(self, model, x, y):
        return train_pass(model, x, y)

    def make_trainer(self, model, lr, momentum=0.0, precision="fp32", compile=False):
        interface.check_precision(precision)
        return Trainer(model, lr, momentum, precision, compile)
