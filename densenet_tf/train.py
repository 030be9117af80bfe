"""Training and evaluation steps in TensorFlow: GradientTape, keras.optimizers.SGD, tf.function."""

import contextlib
import functools

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from conformance import interface

from .weights import from_canonical, to_canonical


def loss_fn(labels, logits):
    """Mean softmax cross-entropy. The function form keeps the logits' dtype; the Loss
    classes would compute a float64 model's loss in float32 (floatx)."""
    return ops.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))


def sgd(model, lr, momentum=0.0):
    """Stochastic gradient descent on every trainable variable (momentum 0: plain SGD, as the
    chapter trains), built now: Keras would create the momentum variables at the first step,
    and load_optimizer_state needs them before it."""
    optimizer = keras.optimizers.SGD(learning_rate=learning_rate(lr, model.dtype), momentum=momentum)
    optimizer.build(model.trainable_variables)
    return optimizer


def to_tensors(x, y=None):
    X = tf.convert_to_tensor(x)
    return X if y is None else (X, tf.cast(y, tf.int32))  # the dtype of ops.argmax


def compiled(fn, run_eagerly=False, jit_compile=False):
    """`fn` traced into a TensorFlow graph (once per input shape and dtype), or `fn` itself;
    `jit_compile` compiles the graph with XLA.

    autograph=False: the steps have no tensor-dependent Python control flow, and AutoGraph
    would re-raise an InputError from tracing as a StagingError."""
    return fn if run_eagerly else tf.function(fn, autograph=False, jit_compile=jit_compile)


def gradient_step(model, X, y):
    """Train-mode logits, mean loss and every trainable variable's gradient (BN running statistics update too)."""
    with tf.GradientTape() as tape:
        logits = model(X, training=True)
        loss = loss_fn(y, ops.cast(logits, model.variable_dtype))  # float32 under mixed precision
    return logits, loss, tape.gradient(loss, model.trainable_variables)


def train_pass(model, x, y, run_eagerly=True):
    """gradient_step on NumPy input: logits, loss and canonical gradients out."""
    logits, loss, grads = compiled(functools.partial(gradient_step, model), run_eagerly)(*to_tensors(x, y))
    return (
        logits.numpy(),
        float(loss),
        to_canonical(model, {v.path: g for v, g in zip(model.trainable_variables, grads)}),
    )


def learning_rate(lr, dtype):
    """Keras keeps a float learning rate in a variable of floatx (float32): 0.1 would be
    0.10000000149 in a float64 model's steps. A callable can give the rate in the model's dtype."""
    return lr if dtype == keras.config.floatx() else lambda: ops.convert_to_tensor(lr, dtype)


@contextlib.contextmanager
def float32_mode(precision):
    """TF32 for float32 matmuls and convolutions on (precision tf32, bf16) or off (fp32) for
    the duration, then as before: the backend keeps exact float32 for the checks."""
    saved = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(precision != "fp32")
    try:
        yield
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(saved)


def use_mixed_bfloat16(model):
    """Keras' mixed precision (bfloat16 compute, float32 variables) for a model already built:
    the policy is set on every layer, as Keras would have at construction under the global one."""
    for layer in model._flatten_layers(include_self=True, recursive=True):  # Keras has no public walk
        layer.dtype_policy = "mixed_bfloat16"


class Trainer(interface.Trainer):
    layout = "NHWC"

    def __init__(self, model, lr, momentum=0.0, precision="fp32", compile=False, run_eagerly=False):
        self.model, self.lr, self.precision = model, lr, precision
        if precision == "bf16":
            use_mixed_bfloat16(model)
        self.optimizer = sgd(model, lr, momentum)
        self.compiled_step = compiled(self.step, run_eagerly, compile)
        self.compiled_gather_step = compiled(self.gather_step, run_eagerly, compile)
        self.compiled_predict = compiled(self.logits, run_eagerly)
        on_gpu = bool(tf.config.get_visible_devices("GPU"))
        mixed = interface.arithmetic_words(precision, on_gpu, "Keras mixed_bfloat16 policy")
        self.arithmetic = mixed + (", XLA (jit_compile=True)" if compile else "")

    def logits(self, X):
        logits = self.model(ops.cast(X, self.model.compute_dtype), training=False)
        return ops.cast(logits, self.model.variable_dtype)

    def step(self, X, y):
        logits, loss, grads = gradient_step(self.model, ops.cast(X, self.model.compute_dtype), y)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        return loss, ops.sum(ops.cast(ops.argmax(logits, axis=-1) == y, "int32"))

    def train_step(self, x, y):
        with float32_mode(self.precision):
            loss, correct = self.compiled_step(*to_tensors(x, y))
        return float(loss), int(correct)

    def gather_step(self, images, labels, indices):
        """step on the examples `indices` of the device-resident set, made float there."""
        X = ops.expand_dims(ops.cast(ops.take(images, indices, axis=0), self.model.variable_dtype) / 255, axis=-1)
        return self.step(X, ops.take(labels, indices, axis=0))

    def set_data(self, images, labels):
        # float16 holds 0..255 exactly, in half float32's memory; uint8 would do in a quarter,
        # but TensorFlow's GatherV2 has no GPU kernel for uint8 and would gather on the CPU.
        self.images, self.labels = to_tensors(images.astype(np.float16), labels)
        self.reset_sums()

    def step_on(self, indices):
        with float32_mode(self.precision):
            loss, correct = self.compiled_gather_step(self.images, self.labels, tf.convert_to_tensor(indices))
        self.record_step(loss, correct, len(indices))

    def fetch(self, values):
        return tf.stack(values).numpy()

    def activation_bytes(self, indices):
        """The allocator's peak above what it held, over one eager forward and backward pass
        (GradientTape), where the device's allocator keeps statistics. The moving statistics
        the pass updates are put back."""
        spec = tf.DeviceSpec.from_string(self.images.device)
        device = f"{spec.device_type}:{spec.device_index}"
        try:
            tf.config.experimental.reset_memory_stats(device)
            before = tf.config.experimental.get_memory_info(device)["current"]
        except ValueError:  # an allocator without statistics
            return None
        statistics = [v.numpy() for v in self.model.non_trainable_variables]
        indices = tf.convert_to_tensor(indices)
        X = ops.expand_dims(ops.cast(ops.take(self.images, indices, axis=0), self.model.variable_dtype) / 255, -1)
        gradient_step(self.model, ops.cast(X, self.model.compute_dtype), ops.take(self.labels, indices, axis=0))
        peak = tf.config.experimental.get_memory_info(device)["peak"] - before
        for variable, value in zip(self.model.non_trainable_variables, statistics):
            variable.assign(value)
        return int(peak), "the allocator's peak over one eager forward and backward pass"

    def wait(self):
        # A read queues behind every step on the variable's device. (tf.test.experimental.sync_devices
        # would do too, but fails under MultiWorkerMirroredStrategy.)
        self.optimizer.iterations.numpy()

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
        momentums = from_canonical(
            self.model, {key: -self.lr * np.asarray(value, "float64") for key, value in state.items()}
        )
        for v, m in zip(self.model.trainable_variables, self.optimizer.momentums):
            if v.path in momentums:
                m.assign(momentums[v.path])
