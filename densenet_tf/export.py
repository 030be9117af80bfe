"""The Keras DenseNet in deployment formats: the `.keras` file (native) and ONNX.

Keras 3 writes ONNX itself (`model.export(format="onnx")`), through tf2onnx on the
TensorFlow backend. Both formats take any batch size and input size. Keras exports only a
model that has been called, even a built one, so a model never called is called once first.
"""

import keras
import numpy as np
import tf2onnx

from conformance.files import atomic_write_bytes, bytes_written_by

EXPORTER = f"keras.Model.export(format='onnx') via tf2onnx {tf2onnx.__version__}, Keras {keras.__version__}"
NATIVE_SUFFIX = ".keras"


def example_input(model, size):
    return np.zeros((2, size, size, model.spec.in_channels), dtype=model.dtype)


def save_native(model, path, size):
    atomic_write_bytes(path, bytes_written_by(model.save, NATIVE_SUFFIX))


def load_native(path):
    """The saved model as a function from a NumPy batch to NumPy logits."""
    model = keras.models.load_model(path)
    return lambda x: keras.ops.convert_to_numpy(model(x, training=False))


def export_onnx(model, path, size):
    model(example_input(model, size), training=False)  # "The model provided has never called" otherwise
    atomic_write_bytes(path, bytes_written_by(lambda name: model.export(name, format="onnx", verbose=False), ".onnx"))
