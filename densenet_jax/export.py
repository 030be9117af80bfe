"""The Flax DenseNet in deployment formats: `jax.export`'s serialized StableHLO (native) and ONNX.

Both trace the eval-mode apply with the variables baked in, at one input size with a
symbolic batch axis. ONNX goes through jax2onnx, which converts the traced jaxpr.

jax2onnx 0.17 annotates the graph's intermediate tensors (`value_info`) with the NHWC shapes of
the jaxpr, while the graph itself computes in NCHW around each convolution: onnxruntime ignores
the annotations and runs the graph correctly, but `onnx.checker.check_model(full_check=True)`
refuses it ("Inferred shape and existing shape differ"). The annotations are optional, so they
are dropped and ONNX's own shape inference writes them again from the graph.
"""

from functools import partial
from importlib.metadata import version

import jax
import jax2onnx
import numpy as np
import onnx

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
    atomic_write_bytes(path, reinferred_shapes(graph).SerializeToString())


def reinferred_shapes(graph):
    """The graph with jax2onnx's intermediate shape annotations replaced by ONNX's inferred ones."""
    del graph.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(graph, check_type=True, strict_mode=True)
