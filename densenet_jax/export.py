"""The Flax DenseNet in deployment formats: `jax.export`'s serialized StableHLO (native) and ONNX.

Both trace the eval-mode apply with the variables baked in, at one input size with a
symbolic batch axis. ONNX goes through jax2onnx, which converts the traced jaxpr.
"""

from functools import partial
from importlib.metadata import version

import jax
import jax2onnx
import numpy as np

from conformance.files import atomic_write_bytes
from conformance.specs import get_spec

EXPORTER = f"jax2onnx.to_onnx, jax2onnx {version('jax2onnx')}, JAX {jax.__version__}"
NATIVE_SUFFIX = ".jax"


def eval_apply(model):
    return partial(model.module.apply, model.variables, train=False)


def input_shape(model, size, batch):
    return (batch, size, size, get_spec(model.module.spec).in_channels)


def save_native(model, path, size):
    (batch,) = jax.export.symbolic_shape("batch")
    X = jax.ShapeDtypeStruct(input_shape(model, size, batch), model.module.dtype)
    exported = jax.export.export(jax.jit(eval_apply(model)))(X)
    atomic_write_bytes(path, exported.serialize())


def load_native(path):
    """The saved function as a function from a NumPy batch to NumPy logits."""
    with open(path, "rb") as stream:
        exported = jax.export.deserialize(bytearray(stream.read()))
    return lambda x: np.asarray(exported.call(x))


def export_onnx(model, path, size):
    graph = jax2onnx.to_onnx(
        eval_apply(model),
        [input_shape(model, size, "batch")],
        model_name="densenet",
        input_names=["input"],
        output_names=["logits"],
    )
    atomic_write_bytes(path, graph.SerializeToString())
