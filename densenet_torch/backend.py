"""The PyTorch backend as the conformance suite sees it: NumPy in, NumPy out."""

import os

import torch

from conformance import interface

from .model import DenseNet
from .train import Trainer, to_device, train_pass
from .weights import export_canonical, load_canonical


def stage_modules(model):
    """(stage, the module whose output ends it): the stem's last layer, each block and transition."""
    children = list(model.features.named_children())
    first_block = [name for name, _ in children].index("denseblock1")
    yield "stem", children[first_block - 1][1]
    yield from ((name, m) for name, m in children if name.startswith(("denseblock", "transition")))


def gpu_device():
    """(this process's CUDA device, "") if PyTorch sees one, else (the CPU, why not). torchrun sets
    LOCAL_RANK: each data-parallel process builds its model on its own GPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu"), "PyTorch sees no CUDA device; ran on the CPU"
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), ""


class Backend(interface.BackendBase):
    name = "torch"
    layout = "NCHW"
    running_var = "unbiased"  # PyTorch's running_var takes the unbiased batch variance

    def __init__(self, device="cpu"):
        super().__init__(device)
        # Numeric checks need full float32: TF32 matmuls and convolutions would round to 10 bits.
        # A trainer with another precision switches TF32 on for its own steps only.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.device = torch.device("cpu")
        if device == "gpu":
            self.device, self.device_note = gpu_device()

    @property
    def device_name(self):
        if self.device.type == "cuda":
            return f"cuda:{self.device.index} {torch.cuda.get_device_name(self.device)}"
        return "cpu"

    def build(self, spec, dtype="float32", memory_efficient=False):
        return DenseNet(spec, memory_efficient).to(self.device, getattr(torch, dtype))

    def load_state(self, model, state):
        load_canonical(model, state)

    def export_state(self, model):
        return export_canonical(model)

    def count_params(self, model):
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        non_trainable = sum(
            b.numel() for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var"))
        )
        return trainable, non_trainable

    @torch.no_grad()
    def stage_shapes(self, model, x):
        shapes = {}
        hooks = [
            module.register_forward_hook(lambda m, i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
            for name, module in stage_modules(model)
        ]
        model.eval()
        try:
            shapes["logits"] = tuple(model(to_device(model, x)).shape)
        finally:
            for hook in hooks:
                hook.remove()
        return shapes

    def forward(self, model, x, train):
        model.train(train)
        with torch.no_grad():
            return model(to_device(model, x)).cpu().numpy()

    def train_pass(self, model, x, y):
        return train_pass(model, x, y)

    def make_trainer(self, model, lr, momentum=0.0, precision="fp32", compile=False):
        interface.check_precision(precision)
        return Trainer(model, lr, momentum, precision, compile)
