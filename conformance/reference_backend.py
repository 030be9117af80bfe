"""The NumPy reference behind the backend interface, so the CLI can name it `reference`.

It computes in float64 and stores float32 states, like a checkpoint. It is slow: use it
for shapes, parameter counts, its own finite-difference check and tiny runs.
"""

from __future__ import annotations

import numpy as np

from . import interface, reference
from .specs import count_params, get_spec, is_running_stat
from .weights import init_state, validate_state


class ReferenceModel:
    def __init__(self, spec):
        self.spec = get_spec(spec)
        self.state = init_state(self.spec, seed=0)


class Trainer(interface.Trainer):
    """SGD with PyTorch's momentum convention: buf = m * buf + g; p -= lr * buf."""

    def __init__(self, model, lr, momentum=0.0):
        self.model, self.lr, self.momentum = model, lr, momentum
        self.buffers: dict[str, np.ndarray] = {}

    def train_step(self, x, y):
        spec, state = self.model.spec, self.model.state
        result = reference.loss_and_gradients(spec, state, x, y)
        for key, value in state.items():
            if is_running_stat(key):
                state[key] = result.running_stats[key].astype(np.float32)
                continue
            step = result.grads[key]
            if self.momentum:
                step = step + self.momentum * self.buffers[key] if key in self.buffers else step
                self.buffers[key] = step
            state[key] = (value - self.lr * step).astype(np.float32)
        return result.loss, int((result.logits.argmax(axis=1) == y).sum())

    def predict(self, x):
        return reference.forward(self.model.spec, self.model.state, x, train=False)

    def export_optimizer_state(self):
        return {key: value.astype(np.float32) for key, value in self.buffers.items()}

    def load_optimizer_state(self, state):
        self.buffers = {key: np.asarray(value, dtype=np.float64) for key, value in state.items()}


class Backend(interface.BackendBase):
    name = "reference"
    layout = "NCHW"
    running_var = "unbiased"

    def __init__(self, device="cpu"):
        super().__init__(device)
        if device != "cpu":
            self.device_note = "the NumPy reference runs on the CPU only"

    @property
    def device_name(self):
        return "cpu (NumPy float64)"

    def build(self, spec, dtype="float32", memory_efficient=False):
        return ReferenceModel(spec)  # NumPy keeps no autograd tape: nothing to recompute

    def load_state(self, model, state):
        model.state = {k: np.array(v, dtype=np.float32) for k, v in validate_state(state, model.spec).items()}

    def export_state(self, model):
        return {key: value.copy() for key, value in model.state.items()}

    def count_params(self, model):
        return count_params(model.spec)

    def stage_shapes(self, model, x):
        return {stage: tuple(shape) for stage, shape in reference.stage_shapes(model.spec, model.state, x).items()}

    def forward(self, model, x, train):
        if not train:
            return reference.forward(model.spec, model.state, x, train=False)
        result = reference.loss_and_gradients(model.spec, model.state, x, np.zeros(len(x), dtype=np.int64))
        model.state.update({key: value.astype(np.float32) for key, value in result.running_stats.items()})
        return result.logits

    def train_pass(self, model, x, y):
        result = reference.loss_and_gradients(model.spec, model.state, x, y)
        return result.logits, result.loss, result.grads

    def make_trainer(self, model, lr, momentum=0.0, precision="fp32", compile=False):
        interface.check_precision(precision)
        trainer = Trainer(model, lr, momentum)
        trainer.precision, trainer.arithmetic = precision, "float64 (NumPy; no other precision)"
        return trainer
