"""The MXNet backend as the conformance suite sees it: NumPy in, NumPy out."""

import os

import mxnet as mx
from mxnet import autograd, init
from mxnet.util import use_np

from conformance import interface

from . import compat  # noqa: F401  (before mxnet)
from .model import DenseNet
from .train import Trainer, to_context, train_pass
from .weights import export_canonical, load_canonical


def gpu_context():
    """(mx.gpu(0), "") if MXNet can run a kernel there, else (mx.cpu(), why not)."""
    if mx.context.num_gpus() == 0:
        return mx.cpu(), "MXNet sees no GPU (this mxnet build has no CUDA, or no GPU is visible); ran on the CPU"
    # Numeric checks need full float32: cuDNN and cuBLAS would use TF32 on Ampere, and MXNet
    # 1.x has no switch of its own. The libraries read this when MXNet first calls them.
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    try:
        (mx.np.ones((2, 2), ctx=mx.gpu(0)) * 2).asnumpy()
    except mx.MXNetError as error:
        reason = next((line for line in str(error).splitlines() if "Error" in line), str(error)).strip()
        return mx.cpu(), (
            f"MXNet cannot run on gpu(0) ({reason}); MXNet 1.9.1 has no kernels for "
            "Hopper (sm_90) or newer GPUs; ran on the CPU"
        )
    return mx.gpu(0), ""


def stage_blocks(model):
    """(stage, the block whose output ends it): the stem's last layer, each block and transition."""
    children = list(model.features._children.items())  # Gluon 1.x's named children
    first_block = [name for name, _ in children].index("denseblock1")
    yield "stem", children[first_block - 1][1]
    yield from ((name, block) for name, block in children if name.startswith(("denseblock", "transition")))


@use_np
class Backend(interface.BackendBase):
    name = "mxnet"
    layout = "NCHW"
    running_var = "biased"  # MXNet's running_var takes the biased batch variance
    float32_hyperparameters = True  # sgd_update and BatchNorm take lr and momentum as C floats

    def __init__(self, device="cpu", hybridize=True):
        super().__init__(device)
        self.hybridize = hybridize
        self.context = mx.cpu()
        if device == "gpu":
            self.context, self.device_note = gpu_context()

    @property
    def device_name(self):
        return "cpu" if self.context.device_type == "cpu" else f"gpu({self.context.device_id})"

    def compile(self, model):
        if self.hybridize:
            model.hybridize(static_alloc=True, static_shape=True)

    def build(self, spec, dtype="float32", memory_efficient=False):
        model = DenseNet(spec, memory_efficient=memory_efficient)
        model.initialize(init.MSRAPrelu(factor_type="in", slope=0.0), ctx=self.context)  # torchvision's Kaiming normal
        model.cast(dtype)
        self.compile(model)
        return model

    def load_state(self, model, state):
        load_canonical(model, state, self.context)

    def export_state(self, model):
        return export_canonical(model)

    def count_params(self, model):
        params = model.collect_params().values()
        trainable = sum(p.data().size for p in params if p.grad_req != "null")
        non_trainable = sum(p.data().size for p in params if p.grad_req == "null")
        return trainable, non_trainable

    def stage_shapes(self, model, x):
        shapes = {}
        hooks = [
            block.register_forward_hook(lambda b, i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
            for name, block in stage_blocks(model)
        ]
        model.hybridize(False)  # hooks see only imperative calls; a hybridized net runs as one graph
        try:
            with autograd.predict_mode():
                shapes["logits"] = tuple(model(to_context(model, x)).shape)
        finally:
            for hook in hooks:
                hook.detach()
            self.compile(model)
        return shapes

    def forward(self, model, x, train):
        # Train mode without recording: batch statistics, no tape. (On the CPU the running
        # statistics move only in BatchNorm's backward pass, see train.py.)
        with autograd.train_mode() if train else autograd.predict_mode():
            return model(to_context(model, x)).asnumpy()

    def train_pass(self, model, x, y):
        return train_pass(model, x, y)

    def make_trainer(self, model, lr, momentum=0.0, precision="fp32", compile=False):
        interface.check_precision(precision)
        return Trainer(model, lr, momentum, precision, compile)
