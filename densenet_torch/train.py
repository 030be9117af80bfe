"""Training and evaluation steps in PyTorch: torch.optim.SGD and cross-entropy."""

import torch
from torch import nn

from conformance import backends

from .weights import from_canonical, to_canonical

loss_fn = nn.CrossEntropyLoss()


def model_device(model):
    return next(model.parameters()).device


def to_device(model, x, y=None):
    device = model_device(model)
    X = torch.from_numpy(x).to(device)
    return X if y is None else (X, torch.from_numpy(y).long().to(device))


def loss_and_gradients(model, x, y):
    """Train-mode loss and every parameter's gradient (BN running statistics update too)."""
    X, y = to_device(model, x, y)
    model.train()
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(X), y)
    loss.backward()
    return loss.item(), to_canonical({name: p.grad for name, p in model.named_parameters()})


class Trainer(backends.Trainer):
    def __init__(self, model, lr, momentum=0.0):
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    def train_step(self, x, y):
        X, y = to_device(self.model, x, y)
        self.model.train()
        logits = self.model(X)
        loss = loss_fn(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item(), (logits.argmax(dim=1) == y).sum().item()

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
