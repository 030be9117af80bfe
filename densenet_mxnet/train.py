"""Training and evaluation steps in MXNet Gluon: gluon.Trainer with SGD, softmax cross-entropy.

Gluon's train mode is autograd's: BatchNorm uses batch statistics and dropout is active
inside `autograd.record()`. On the CPU, MXNet folds the batch statistics into BatchNorm's
running ones in the backward pass, so a train-mode forward alone leaves them unchanged.
"""

import contextlib
import pickle

import numpy as onp
from mxnet import autograd, gluon, np, npx
from mxnet.util import np_array, np_shape, use_np

from conformance import interface

from . import compat  # noqa: F401  (before mxnet)
from .weights import from_canonical, to_canonical, trainable_params

with np_shape(True), np_array(True):  # built in NumPy mode, as the model is (model.py)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()  # one loss per example
    loss_fn.hybridize()


def sgd(model, lr, momentum=0.0):
    """Stochastic gradient descent on every trainable parameter (momentum 0: plain SGD, as the
    chapter trains). update_on_kvstore=False: the trainer updates in place and keeps SGD's
    momentum in its own updater, where export/load_optimizer_state find it."""
    params = list(trainable_params(model).values())
    return gluon.Trainer(params, "sgd", {"learning_rate": lr, "momentum": momentum}, update_on_kvstore=False)


def model_context(model):
    return model.classifier.weight.list_ctx()[0]


@use_np
def to_context(model, x, y=None):
    ctx = model_context(model)
    X = np.array(x, dtype=x.dtype, ctx=ctx)  # keep the dtype: validation rejects what the model cannot take
    return X if y is None else (X, np.array(y, dtype="int64", ctx=ctx))


@use_np
def train_pass(model, x, y):
    """Train-mode logits, mean loss and every trainable parameter's gradient (running statistics update too)."""
    X, y = to_context(model, x, y)
    with autograd.record():
        logits = model(X)
        loss = loss_fn(logits, y).mean()
    loss.backward()
    return logits.asnumpy(), loss.item(), to_canonical({name: p.grad() for name, p in trainable_params(model).items()})


def float32_mode(precision):
    """Nothing to switch: MXNet 1.x has no TF32 setting of its own, and the backend sets
    NVIDIA_TF32_OVERRIDE=0 for the whole process on a GPU (the checks need exact float32)."""
    return contextlib.nullcontext()


def arithmetic(precision, ctx):
    """What a trainer asked for `precision` really computes in (always float32 here)."""
    if precision == "bf16":
        return (
            "fp32 (bf16 asked: MXNet 1.9 has no bfloat16 training path here; its AMP trains "
            "float16 on GPUs, bfloat16 only through oneDNN)"
        )
    if precision == "tf32" and ctx.device_type == "gpu":
        return "fp32 (tf32 asked: NVIDIA_TF32_OVERRIDE=0 holds for the whole MXNet process)"
    return interface.arithmetic_words(precision, on_gpu=False, mixed="")


@use_np
class Trainer(interface.Trainer):
    def __init__(self, model, lr, momentum=0.0, precision="fp32", compile=False):
        self.model, self.lr, self.precision = model, lr, precision
        self.dtype = model.classifier.weight.dtype  # the images' in step_on: float64 trains in float64
        self.arithmetic = arithmetic(precision, model_context(model))
        self.names = list(trainable_params(model))
        self.trainer = sgd(model, lr, momentum)

    def step(self, X, y):
        """One SGD step; the loss and the correct count stay on the device (MXNet runs ahead)."""
        with float32_mode(self.precision), autograd.record():
            logits = self.model(X)
            loss = loss_fn(logits, y)
        loss.backward()
        self.trainer.step(len(y))  # gradients of the summed loss, divided by the batch size
        return loss.mean(), (logits.argmax(axis=1) == y).sum()

    def train_step(self, x, y):
        loss, correct = self.step(*to_context(self.model, x, y))
        return loss.item(), int(correct.item())

    def set_data(self, images, labels):
        self.images, self.labels = to_context(self.model, images, labels)  # uint8: a quarter of float32
        self.reset_sums()

    def step_on(self, indices):
        index = np.array(indices, dtype="int64", ctx=model_context(self.model))
        X = np.expand_dims(self.images[index].astype(self.dtype) / 255, axis=1)
        self.record_step(*self.step(X, self.labels[index]), len(indices))

    def fetch(self, values):
        return np.stack(values).asnumpy()

    def wait(self):
        npx.waitall()  # reading the losses waits for them only, not for the updates queued after them

    def predict(self, x):
        with autograd.predict_mode():
            return self.model(to_context(self.model, x)).asnumpy()

    @property
    def updater(self):
        # gluon.Trainer has no public accessor for optimizer state in MXNet 1.x; its updater
        # keys each parameter's state by the parameter's index in the list given to the trainer.
        return self.trainer._updaters[0]

    # MXNet's SGD keeps mom = m * mom - lr * g and adds it (w += mom); PyTorch's buffer is
    # buf = m * buf + g with w -= lr * buf, so buf = -mom / lr at a fixed learning rate.

    # The conversion runs in float64, so that loading what was exported gives back MXNet's
    # state bit for bit (float32 arithmetic would not, and a resumed run would drift).

    def export_optimizer_state(self):
        moms = to_canonical({self.names[i]: mom for i, mom in self.updater.states.items() if mom is not None})
        return {key: -mom.astype("float64") / self.lr for key, mom in moms.items()}

    def load_optimizer_state(self, state):
        moms = from_canonical(
            self.model, {key: -self.lr * onp.asarray(value, "float64") for key, value in state.items()}
        )
        states = {self.names.index(name): mom.as_nd_ndarray() for name, mom in moms.items()}
        self.updater.set_states(pickle.dumps(states))
