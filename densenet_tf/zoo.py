"""Keras applications interop and the constructors `keras.applications` users know.

Weights go in and out through Keras applications' own DenseNet builder and Keras' own
`load_weights` / `save_weights` (legacy `.h5` through Keras' legacy HDF5 writer), never by
parsing HDF5: h5py only lists the file's layer names, to learn the block config to build.
`conformance.zoo` renames the layers and folds Keras' BatchNorm epsilon (1.001e-5) into the
running variance.
"""

import os
import warnings

import h5py
import keras
import numpy as np
from keras import layers, ops
from keras.src.applications.densenet import DenseNet as KerasDenseNet
from keras.src.legacy.saving import legacy_h5_format

from conformance import zoo
from conformance.weights import atomic_write_bytes

from .model import DenseNet
from .weights import load_canonical


def keras_layer_names(path):
    """Layer names in a legacy `.h5` (its `layer_names` attribute) or a Keras 3 `.weights.h5` file."""
    try:
        with h5py.File(path, "r") as f:
            group = f["model_weights"] if "model_weights" in f else f
            if "layer_names" in group.attrs:
                return [name.decode() if isinstance(name, bytes) else name for name in group.attrs["layer_names"]]
            names = []
            group.visititems(
                lambda key, item: (
                    names.append(item.attrs["name"]) if key.endswith("/vars") and "name" in item.attrs else None
                )
            )
            return names
    except OSError as error:
        raise zoo.ZooError(f"{path} is not a readable HDF5 file (truncated or corrupt?): {error}") from None


def keras_application(spec, include_top=True, classifier_activation=None, input_shape=None):
    """Keras applications' own DenseNet for `spec` (which must be one it can build)."""
    return KerasDenseNet(
        list(spec.block_config),
        include_top=include_top,
        weights=None,
        input_shape=input_shape or (224, 224, 3),
        classes=spec.num_classes,
        classifier_activation=classifier_activation,
    )


def read_zoo(path, fmt="keras-h5"):
    """A Keras applications DenseNet file (legacy `.h5` or `.weights.h5`) as a canonical state."""
    names = keras_layer_names(path)
    if "conv1_conv" not in names or "predictions" not in names:
        raise zoo.ZooError(
            f"{path} is not a Keras applications DenseNet with its classifier: no "
            f"{'conv1_conv' if 'conv1_conv' not in names else 'predictions'} layer among "
            f"{len(names)} layers ({', '.join(names[:6])}, ...)"
        )
    blocks = zoo.keras_block_config(names)
    if len(blocks) != 4:
        raise zoo.ZooError(f"{path}: Keras applications' DenseNet has 4 dense blocks, this file {len(blocks)}")
    with h5py.File(path, "r") as f:
        classes = _predictions_classes(f, path)
    spec = zoo.keras_spec(blocks, classes)
    model = keras_application(spec)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Skipping nested container")
            model.load_weights(str(path))
    except (ValueError, KeyError, OSError) as error:
        raise zoo.ZooError(f"{path} does not load into Keras applications' {spec.name}: {error}") from None
    weights = {layer.name: [w.numpy() for w in layer.weights] for layer in model.layers if layer.weights}
    return zoo.from_keras(weights, spec, str(path)), []


def _predictions_classes(f, path):
    found = []
    f.visititems(
        lambda key, item: (
            found.append(item.shape[-1])
            if isinstance(item, h5py.Dataset) and item.ndim == 2 and _is_predictions(f, key)
            else None
        )
    )
    if not found:
        raise zoo.ZooError(f"{path}: no 2-D kernel in its predictions layer")
    return int(found[0])


def _is_predictions(f, key):
    parts = key.split("/")
    if "predictions" in parts:
        return True
    vars_group = "/".join(parts[:-1])
    return f[vars_group].attrs.get("name") == "predictions" if vars_group else False


def write_zoo(path, state, spec, fmt="keras-h5"):
    """A file that `keras.applications.DenseNet121(weights=PATH)` (or the builder) loads."""
    zoo.check_keras_spec(spec, path)
    model = keras_application(spec)
    for name, arrays in zoo.to_keras(state, spec).items():
        model.get_layer(name).set_weights(arrays)
    tmp = f"{path}.tmp.weights.h5"
    if fmt == "keras":
        model.save_weights(tmp)
    else:
        with h5py.File(tmp, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, model)
    with open(tmp, "rb") as f:
        data = f.read()
    os.unlink(tmp)
    atomic_write_bytes(path, data)


def preprocess_input(images):
    """uint8 or [0, 255] float NHWC RGB images, normalised like torchvision (Keras' 'torch' mode)."""
    images = ops.cast(images, "float32") / 255.0
    return (images - ops.convert_to_tensor(zoo.IMAGENET_MEAN)) / ops.convert_to_tensor(zoo.IMAGENET_STD)


def _densenet(
    name, include_top=True, weights=None, input_shape=None, pooling=None, classes=1000, memory_efficient=False
):
    spec, state = zoo.weights_for(name, weights, classes)
    model = DenseNet(spec, memory_efficient=memory_efficient)
    if state is not None:
        load_canonical(model, state)
    if include_top:
        return model
    return _feature_extractor(model, input_shape, pooling)


def _feature_extractor(model, input_shape, pooling):
    """keras.applications' include_top=False: the features (after the last ReLU), pooled or not."""
    pools = {
        None: [],
        "avg": [layers.GlobalAveragePooling2D(name="avg_pool")],
        "max": [layers.GlobalMaxPooling2D(name="max_pool")],
    }
    if pooling not in pools:
        raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")
    inputs = keras.Input(input_shape or (None, None, model.spec.in_channels))
    return keras.Sequential([inputs, model.features, model.relu, *pools[pooling]], name=f"{model.spec.name}_features")


def DenseNet121(include_top=True, weights=None, input_shape=None, pooling=None, classes=1000, memory_efficient=False):
    """`keras.applications.DenseNet121`: `weights` is None or a path in any format `convert` reads.
    Returns logits (no softmax, unlike Keras applications' default). `memory_efficient`
    (torchvision's option) recomputes each dense layer's concatenation and first BN-ReLU-Conv
    in the backward pass: the same weights, less activation memory."""
    return _densenet("densenet121", include_top, weights, input_shape, pooling, classes, memory_efficient)


def DenseNet169(include_top=True, weights=None, input_shape=None, pooling=None, classes=1000, memory_efficient=False):
    return _densenet("densenet169", include_top, weights, input_shape, pooling, classes, memory_efficient)


def DenseNet201(include_top=True, weights=None, input_shape=None, pooling=None, classes=1000, memory_efficient=False):
    return _densenet("densenet201", include_top, weights, input_shape, pooling, classes, memory_efficient)


def zoo_sample(path, spec, x_nchw, seed=0):
    """Keras applications' own DenseNet with random weights and BatchNorm statistics, saved with
    Keras' legacy HDF5 writer; returns its logits (no softmax) on `x_nchw`."""
    model = keras_application(spec, input_shape=x_nchw.shape[2:] + (3,))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.set_weights(
                [zoo.random_bn(rng, leaf, w.shape) for leaf, w in zip(zoo.KERAS_NORM_ORDER, layer.weights)]
            )
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return np.asarray(model(x_nchw.transpose(0, 2, 3, 1), training=False))
