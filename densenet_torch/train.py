"""Training and evaluation steps in PyTorch: torch.optim.SGD and cross-entropy."""

import contextlib

import torch
from torch import nn

from conformance import interface

from .weights import from_canonical, to_canonical

loss_fn = nn.CrossEntropyLoss()


def sgd(model, lr, momentum=0.0, fused=False):
    """Stochastic gradient descent on every parameter (momentum 0: plain SGD, as the chapter trains).
    `fused`: one kernel updates every parameter (the same arithmetic, fewer launches on a GPU)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, fused=fused)


def model_device(model):
    return next(model.parameters()).device


def to_device(model, x, y=None):
    device = model_device(model)
    X = torch.from_numpy(x).to(device)
    return X if y is None else (X, torch.from_numpy(y).long().to(device))


def train_pass(model, x, y):
    """Train-mode logits, loss and every parameter's gradient (BN running statistics update too)."""
    X, y = to_device(model, x, y)
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(X)
    loss = loss_fn(logits, y)
    loss.backward()
    return (
        logits.detach().cpu().numpy(),
        loss.item(),
        to_canonical({name: p.grad for name, p in model.named_parameters()}),
    )


@contextlib.contextmanager
def float32_mode(precision):
    """TF32 for float32 matmuls and convolutions on (precision tf32, bf16) or off (fp32) for
    the duration, then as before: the backend keeps exact float32 for the checks."""
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = [flag.allow_tf32 for flag in flags]
    for flag in flags:
        flag.allow_tf32 = precision != "fp32"
    try:
        yield
    finally:
        for flag, value in zip(flags, saved):
            flag.allow_tf32 = value


def pinned(array):
    """A host tensor a GPU copies from asynchronously: from pageable memory, the copy waits for
    the GPU's queued work first (page-locked memory needs a GPU, so on a CPU the tensor as is)."""
    tensor = torch.from_numpy(array)
    return tensor.pin_memory() if torch.cuda.is_available() else tensor


class Trainer(interface.Trainer):
    def __init__(self, model, lr, momentum=0.0, precision="fp32", compile=False):
        self.model, self.precision, self.device = model, precision, model_device(model)
        self.dtype = next(model.parameters()).dtype  # the images' in step_on: float64 trains in float64
        on_gpu = self.device.type == "cuda"
        self.optimizer = sgd(model, lr, momentum, fused=on_gpu)
        self.bf16 = precision == "bf16"
        # The layout cuDNN's tensor-core convolutions and oneDNN's bf16 ones are fastest in.
        self.channels_last = on_gpu or self.bf16
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if on_gpu:
            torch.backends.cudnn.benchmark = True  # fixed shapes: time cuDNN's algorithms once, keep the fastest
        self.net = torch.compile(model) if compile else model
        mixed = interface.arithmetic_words(precision, self.device.type == "cuda", "torch.autocast, channels_last")
        self.arithmetic = mixed + (", torch.compile" if compile else "")

    def step(self, X, y):
        """One SGD step; the loss and the correct count stay on the device."""
        self.model.train()
        with float32_mode(self.precision):
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                logits = self.net(X)
                loss = loss_fn(logits, y)  # autocast computes cross-entropy in float32
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return loss.detach(), (logits.argmax(dim=1) == y).sum()

    def train_step(self, x, y):
        loss, correct = self.step(*to_device(self.model, x, y))
        return loss.item(), correct.item()

    def set_data(self, images, labels):
        self.images = torch.tensor(images, device=self.device)  # uint8: a quarter of float32
        self.labels = torch.tensor(labels, dtype=torch.long, device=self.device)
        self.reset_sums()

    def batch_on(self, indices):
        """The examples `indices` of the device-resident set, made float there."""
        index = pinned(indices).to(self.device, non_blocking=True)
        X = self.images[index].unsqueeze(1).to(self.dtype) / 255
        if self.channels_last:
            X = X.contiguous(memory_format=torch.channels_last)
        return X, self.labels[index]

    def step_on(self, indices):
        self.record_step(*self.step(*self.batch_on(indices)), len(indices))

    def fetch(self, values):
        return torch.stack(values).cpu().numpy()

    def activation_bytes(self, indices):
        """What one train-mode forward saves for the backward pass (saved_tensors_hooks), the
        parameters left out; the running statistics it moves are put back."""
        parameters = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        saved = {}

        def keep(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        self.model.train()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                X, y = self.batch_on(indices)
                loss_fn(self.net(X), y)
        with torch.no_grad():
            for name, b in self.model.named_buffers():
                b.copy_(buffers[name])
        return sum(saved.values()), "tensors saved for the backward pass (torch.autograd.graph.saved_tensors_hooks)"

    def wait(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def predict(self, x):
        self.model.eval()
        return self.model(to_device(self.model, x)).cpu().numpy()

    def export_optimizer_state(self):
        buffers = {name: self.optimizer.state[p].get("momentum_buffer") for name, p in self.model.named_parameters()}
        return to_canonical({name: buf for name, buf in buffers.items() if buf is not None})

    def load_optimizer_state(self, state):
        tensors = from_canonical(self.model, state)
        for name, p in self.model.named_parameters():
            if name in tensors:
                self.optimizer.state[p]["momentum_buffer"] = tensors[name]
