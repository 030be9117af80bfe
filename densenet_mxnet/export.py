"""The Gluon DenseNet in deployment formats: `export`'s symbol + params (native) and ONNX.

MXNet's ONNX exporter (`mx.onnx.export_model`, MXNet 1.9.1) predates two things we use: the
NumPy-interface operators (`mx.np`), and onnx >= 1.15, which removed the `onnx.mapping`
tables it reads. Both are bridged below without touching the graph's arithmetic.
"""

import sys
import tempfile
import types
from pathlib import Path

import mxnet as mx
import numpy as onp
import onnx
from mxnet import gluon, np
from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph
from mxnet.onnx.mx2onnx._op_translations import _op_translations_opset12 as opset12
from mxnet.util import use_np

from conformance.files import atomic_write_bytes

from . import compat  # noqa: F401  (before mxnet)

EXPORTER = f"mx.onnx.export_model, MXNet {mx.__version__}, onnx {onnx.__version__}"
NATIVE_SUFFIX = ""  # a prefix: PREFIX-symbol.json and PREFIX-0000.params


def native_files(prefix):
    return Path(f"{prefix}-symbol.json"), Path(f"{prefix}-0000.params")


@use_np
def save_native(model, prefix, size):
    """Hybridize, trace one batch of `size` (Gluon builds its graph on the first call), export."""
    model.hybridize()
    model(np.zeros((2, model.spec.in_channels, size, size), dtype=model.classifier.weight.dtype))
    with tempfile.TemporaryDirectory() as tmp:
        model.export(f"{tmp}/model", epoch=0)
        for written, path in zip(native_files(f"{tmp}/model"), native_files(prefix)):
            atomic_write_bytes(path, written.read_bytes())


@use_np
def load_native(prefix):
    """The saved model as a function from a NumPy batch to NumPy logits."""
    symbol, params = native_files(prefix)
    block = gluon.SymbolBlock.imports(str(symbol), ["data"], str(params))
    return use_np(lambda x: block(np.array(x, dtype=x.dtype)).asnumpy())


def restore_onnx_mapping():
    """onnx.mapping's two tables, as MXNet's exporter reads them (onnx >= 1.15 dropped the module)."""
    if "onnx.mapping" in sys.modules:
        return
    to_numpy = {}
    for tensor_type in onnx.helper.get_all_tensor_dtypes():
        try:
            to_numpy[tensor_type] = onp.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type))
        except TypeError:  # a type NumPy has no dtype for
            continue
    mapping = types.ModuleType("onnx.mapping")
    mapping.TENSOR_TYPE_TO_NP_TYPE = to_numpy
    mapping.NP_TYPE_TO_TENSOR_TYPE = {dtype: tensor_type for tensor_type, dtype in reversed(to_numpy.items())}
    onnx.mapping = sys.modules["onnx.mapping"] = mapping


@MXNetGraph.register("_npi_concatenate")
def convert_np_concatenate(node, **kwargs):
    """mx.np.concatenate is the legacy Concat with `axis` for `dim`."""
    return opset12.convert_concat({**node, "attrs": {"dim": node["attrs"]["axis"]}}, **kwargs)


MXNetGraph.register("_npx_relu")(opset12.convert_relu)


@use_np
def export_onnx(model, path, size):
    restore_onnx_mapping()
    in_channels = model.spec.in_channels
    dtype = onp.dtype(model.classifier.weight.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        save_native(model, f"{tmp}/model", size)
        symbol, params = native_files(f"{tmp}/model")
        mx.onnx.export_model(
            str(symbol),
            str(params),
            [(2, in_channels, size, size)],
            [dtype],
            f"{tmp}/model.onnx",
            dynamic=True,
            dynamic_input_shapes=[(None, in_channels, None, None)],
        )
        graph = onnx.load(f"{tmp}/model.onnx")
    # MXNet lists the weights among the graph's inputs too, as ONNX before IR version 4 did.
    weights = {tensor.name for tensor in graph.graph.initializer}
    inputs = [value for value in graph.graph.input if value.name not in weights]
    del graph.graph.input[:]
    graph.graph.input.extend(inputs)
    atomic_write_bytes(path, graph.SerializeToString())
