"""Gluon model-zoo interop and the constructors Gluon users know (`get_model`, `densenet121`).

Files are read with `mx.nd.load` and written by the model zoo's own DenseNet through
`save_parameters`. Both belong to MXNet's legacy NDArray mode, while this package runs in
NumPy mode (`use_np`, scoped to its own calls): `legacy_mode()` switches for the duration and back.
`conformance.zoo` maps the zoo's structural names (`features.4.0.1.2.weight`) to ours.
"""

import contextlib

import mxnet as mx
import numpy as onp
from mxnet import npx, util
from mxnet.gluon.model_zoo.vision import densenet as gluon_densenet
from mxnet.util import use_np

from conformance import zoo
from conformance.files import atomic_write_bytes, bytes_written_by

from . import compat  # noqa: F401  (before mxnet)
from .model import DenseNet
from .weights import canonical_key, load_canonical


@contextlib.contextmanager
def legacy_mode():
    """MXNet's NDArray mode, which `mx.nd.load` and the model zoo's blocks need."""
    array, shape = util.is_np_array(), util.is_np_shape()
    npx.reset_np()
    try:
        yield
    finally:
        npx.set_np(shape=shape, array=array)


def gluon_application(spec):
    """The Gluon model zoo's own DenseNet for `spec` (built in legacy mode)."""
    zoo.check_gluon_spec(spec, spec.name)
    with legacy_mode():
        return gluon_densenet.DenseNet(
            spec.num_init_features,
            spec.growth_rate,
            list(spec.block_config),
            bn_size=spec.bn_size,
            classes=spec.num_classes,
        )


@use_np
def read_zoo(path, fmt="gluon"):
    """A Gluon model-zoo `.params` file as (canonical state, notes). A file saved in NumPy mode
    (as this package's DenseNet saves) is read in NumPy mode; its names are ours already."""
    with open(path, "rb") as stream:
        zoo.check_params_sizes(stream.read(), path)  # before MXNet allocates what a damaged header claims
    try:
        try:
            with legacy_mode():
                loaded = mx.nd.load(str(path))
            numpy_mode = False
        except mx.base.MXNetError as error:
            if "np shape semantics" not in str(error):
                raise
            loaded, numpy_mode = npx.load(str(path)), True
        if not isinstance(loaded, dict):
            raise zoo.ZooError(f"{path} holds an unnamed list of {len(loaded)} arrays, not Gluon parameters")
        params = {name.split(":", 1)[-1]: value.asnumpy() for name, value in loaded.items()}  # "arg:" in old files
    except zoo.ZooError:
        raise
    except Exception as error:  # any parser failure of a file that is not MXNet's
        raise zoo.ZooError(
            f"{path} is not a readable MXNet .params file (truncated or corrupt?): {zoo.reason(error)}"
        ) from None
    if numpy_mode and "output.weight" not in params:  # our DenseNet's structural names: gamma/beta for weight/bias
        state, notes = zoo.from_checkpoint({canonical_key(name): value for name, value in params.items()}, str(path))
        return state, ["saved in MXNet's NumPy mode with densenet_mxnet's parameter names", *notes]
    spec = zoo.gluon_spec({name: value.shape for name, value in params.items()}, str(path))
    return zoo.from_gluon(params, spec, str(path)), []


def write_zoo(path, state, spec, fmt="gluon"):
    """A file that the model zoo's DenseNet `load_parameters` takes."""
    net = gluon_application(spec)
    params = net._collect_params_with_prefix()  # structural names, as save_parameters writes them
    with legacy_mode():
        for name, value in zoo.to_gluon(state, spec).items():
            params[name]._load_init(mx.nd.array(value), mx.cpu())  # what load_parameters does per parameter
        data = bytes_written_by(net.save_parameters, ".params")
    atomic_write_bytes(path, data)


@use_np
def preprocess_input(images):
    """uint8 or [0, 255] float NCHW RGB images (mx.np), normalised like torchvision."""
    mean = mx.np.array(zoo.IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = mx.np.array(zoo.IMAGENET_STD).reshape(1, 3, 1, 1)
    return (images.astype("float32") / 255.0 - mean) / std


@use_np
def get_model(name, pretrained=False, classes=1000, ctx=None, memory_efficient=False):
    """`gluon.model_zoo.vision.get_model`: `pretrained` is False or a path in any format `convert` reads.
    `memory_efficient` is accepted and has no effect in MXNet 1.9 (see `DenseNet`)."""
    spec, state = zoo.weights_for(name, pretrained, classes)
    model = DenseNet(spec, memory_efficient)
    if state is None:
        model.initialize(mx.init.Xavier(), ctx=ctx)
    else:
        load_canonical(model, state, ctx)
    return model


def densenet121(pretrained=False, classes=1000, ctx=None, memory_efficient=False):
    return get_model("densenet121", pretrained, classes, ctx, memory_efficient)


def densenet161(pretrained=False, classes=1000, ctx=None, memory_efficient=False):
    return get_model("densenet161", pretrained, classes, ctx, memory_efficient)


def densenet169(pretrained=False, classes=1000, ctx=None, memory_efficient=False):
    return get_model("densenet169", pretrained, classes, ctx, memory_efficient)


def densenet201(pretrained=False, classes=1000, ctx=None, memory_efficient=False):
    return get_model("densenet201", pretrained, classes, ctx, memory_efficient)


def zoo_sample(path, spec, x_nchw, seed=0):
    """The Gluon model zoo's own DenseNet with random weights and BatchNorm statistics, saved with
    `save_parameters`; returns its logits on `x_nchw` (224x224: its AvgPool2D(7) needs a 7x7 map)."""
    net = gluon_application(spec)
    rng = onp.random.default_rng(seed)
    with legacy_mode():
        net.initialize(mx.init.Xavier())
        net(mx.nd.zeros((1,) + x_nchw.shape[1:]))  # the zoo's layers infer their input widths
        for name, param in net._collect_params_with_prefix().items():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gamma", "beta", "running_mean", "running_var"):
                param.set_data(mx.nd.array(zoo.random_bn(rng, {"gamma": "weight"}.get(leaf, leaf), param.shape)))
        net.save_parameters(str(path))
        return net(mx.nd.array(x_nchw)).asnumpy()
