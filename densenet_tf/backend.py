"""The TensorFlow/Keras backend as the conformance suite sees it: NumPy in, NumPy out."""

import functools

import keras
import numpy as np
import tensorflow as tf

from conformance import interface

from .model import DenseNet
from .train import Trainer, compiled, to_tensors, train_pass
from .weights import export_canonical, load_canonical


def stage_layers(model):
    """(stage, the layer whose output ends it): the stem's last layer, each block and transition."""
    children = model.features.layers
    first_block = [layer.name for layer in children].index("denseblock1")
    yield "stem", children[first_block - 1]
    yield from ((layer.name, layer) for layer in children if layer.name.startswith(("denseblock", "transition")))


def hide_gpus():
    """Keep every model, step and trainer of this process on the CPU; False if too late
    (TensorFlow fixes its devices when it first runs)."""
    try:
        tf.config.set_visible_devices([], "GPU")
        return True
    except RuntimeError:
        return False


def count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


class Backend(interface.BackendBase):
    name = "tf"
    layout = "NHWC"
    running_var = "biased"  # Keras' moving_variance takes the biased batch variance

    def __init__(self, device="cpu", run_eagerly=True):
        """`run_eagerly` is for the one-off probes, forward and gradients: op by op spares a
        trace per call; False runs them as tf.functions. Trainers always train with a
        tf.function step, as Keras users do."""
        super().__init__(device)
        self.run_eagerly = run_eagerly
        # Numeric checks need full float32: TF32 matmuls and convolutions would round to 10 bits.
        # A trainer with another precision switches TF32 on for its own steps only.
        tf.config.experimental.enable_tensor_float_32_execution(False)
        gpus = tf.config.get_visible_devices("GPU")
        if device == "gpu" and not gpus:
            self.device_note = (
                "TensorFlow sees no GPU (a CPU-only build, its CUDA 12 libraries not on "
                "LD_LIBRARY_PATH, or hidden by a CPU backend earlier in this process); ran on the CPU"
            )
        if device == "cpu" and gpus and not hide_gpus():
            self.device_note = "TensorFlow had already started on the GPU in this process; ran there"
        self.device = "gpu" if tf.config.get_visible_devices("GPU") else "cpu"

    @property
    def device_name(self):
        if self.device == "gpu":
            details = tf.config.experimental.get_device_details(tf.config.get_visible_devices("GPU")[0])
            return f"gpu:0 {details.get('device_name', '')}".strip()
        return "cpu"

    def build(self, spec, dtype="float32", memory_efficient=False):
        return DenseNet(spec, dtype=dtype, memory_efficient=memory_efficient)

    def load_state(self, model, state):
        load_canonical(model, state)

    def export_state(self, model):
        return export_canonical(model)

    def count_params(self, model):
        return count(model.trainable_weights), count(model.non_trainable_weights)

    def stage_shapes(self, model, x):
        logits = model(x, training=False)  # validates the input; the stage model below does not
        # Keras' way to read intermediate outputs: a functional model over the built layers.
        names, layers = zip(*stage_layers(model))
        stages = keras.Model(model.features.inputs[0], [layer.output for layer in layers])
        shapes = {name: tuple(out.shape) for name, out in zip(names, stages(x))}
        return {**shapes, "logits": tuple(logits.shape)}

    def forward(self, model, x, train):
        return compiled(functools.partial(model, training=train), self.run_eagerly)(to_tensors(x)).numpy()

    def train_pass(self, model, x, y):
        return train_pass(model, x, y, self.run_eagerly)

    def make_trainer(self, model, lr, momentum=0.0, precision="fp32", compile=False):
        interface.check_precision(precision)
        return Trainer(model, lr, momentum, precision, compile)
