"""Training and evaluation steps in TensorFlow: GradientTape, keras.optimizers.SGD, tf.function."""

import functools

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from conformance import backends

from .weights import from_canonical, to_canonical


def loss_fn(labels, logits):
    """Mean softmax cross-entropy. The function form keeps the logits' dtype; the Loss
    classes would compute a float64 model's loss in float32 (floatx)."""
    return ops.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))


def to_tensors(x, y=None):
    X = tf.convert_to_tensor(x)
    return X if y is None else (X, tf.cast(y, tf.int32))  # the dtype of ops.argmax


def compiled(fn, run_eagerly=False):
    """`fn` traced into a TensorFlow graph (once per input shape and dtype), or `fn` itself.

    autograph=False: the steps have no tensor-dependent Python control flow, and AutoGraph
    would re-raise an InputError from tracing as a StagingError."""
    return fn if run_eagerly else tf.function(fn, autograph=False)


def gradient_step(model, X, y):
    """Train-mode logits, mean loss and every trainable variable's gradient (BN running statistics update too)."""
    with tf.GradientTape() as tape:
        logits = model(X, training=True)
        loss = loss_fn(y, logits)
    return logits, loss, tape.gradient(loss, model.trainable_variables)


def loss_and_gradients(model, x, y, run_eagerly=True):
    _, loss, grads = compiled(functools.partial(gradient_step, model), run_eagerly)(*to_tensors(x, y))
    return float(loss), to_canonical(model, {v.path: g for v, g in zip(model.trainable_variables, grads)})


def learning_rate(lr, dtype):
    """Keras keeps a float learning rate in a variable of floatx (float32): 0.1 would be
    0.10000000149 in a float64 model's steps. A callable can give the rate in the model's dtype."""
    return lr if dtype == keras.config.floatx() else lambda: ops.convert_to_tensor(lr, dtype)


class Trainer(backends.Trainer):
    def __init__(self, model, lr, momentum=0.0, run_eagerly=False):
        self.model, self.lr = model, lr
        self.optimizer = keras.optimizers.SGD(learning_rate=learning_rate(lr, model.dtype), momentum=momentum)
        # Keras creates the momentum variables at the first step; load_optimizer_state needs them now.
        self.optimizer.build(model.trainable_variables)
        self.compiled_sgd_step = compiled(self.sgd_step, run_eagerly)
        self.compiled_predict = compiled(functools.partial(model, training=False), run_eagerly)

    def sgd_step(self, X, y):
        logits, loss, grads = gradient_step(self.model, X, y)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        return loss, ops.sum(ops.cast(ops.argmax(logits, axis=-1) == y, "int32"))

    def train_step(self, x, y):
        loss, correct = self.compiled_sgd_step(*to_tensors(x, y))
        return float(loss), int(correct)

    def predict(self, x):
        return self.compiled_predict(to_tensors(x)).numpy()

    # Keras' SGD keeps m = momentum * m - lr * g and adds m to the weights; PyTorch's buffer
    # is buf = momentum * buf + g, subtracted times lr. So buf = -m / lr.

    # The conversion runs in float64, so that loading what was exported gives back Keras'
    # state bit for bit (float32 arithmetic would not, and a resumed run would drift).

    def export_optimizer_state(self):
        momentums = zip(self.model.trainable_variables, self.optimizer.momentums)
        momentums = to_canonical(self.model, {v.path: m.numpy() for v, m in momentums})
        return {key: -m.astype("float64") / self.lr for key, m in momentums.items()}

    def load_optimizer_state(self, state):
        momentums = from_canonical(self.model, {key: -self.lr * np.asarray(value, "float64") for key, value in state.items()})
        for v, m in zip(self.model.trainable_variables, self.optimizer.momentums):
            if v.path in momentums:
                m.assign(momentums[v.path])
