"""Keras applications interop and the constructors `keras.applications` users know.

Weights go in and out through Keras applications' own DenseNet builder and Keras' own
`load_weights` / `save_weights` (legacy `.h5` through Keras' legacy HDF5 writer), never by
parsing HDF5: h5py only lists the file's layer names, to learn the block config to build.
`conformance.zoo` renames the layers and folds Keras' BatchNorm epsilon (1.001e-5) into the
running variance.
"""

import contextlib
import warnings
import zipfile

import h5py
import keras
import numpy as np
from keras import layers, ops
from keras.src.applications.densenet import DenseNet as KerasDenseNet
from keras.src.legacy.saving import legacy_h5_format

from conformance import zoo
from conformance.files import atomic_write_bytes, bytes_written_by

from .model import DenseNet
from .weights import load_canonical


def keras_layers(path):
    """The layers with weights of a legacy `.h5` file, in its order: (name, weight shapes). h5py
    lists them (names and shapes only); the weights are read by Keras' own loader."""
    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in group.attrs:
            raise zoo.ZooError(f"{path} is not a Keras legacy HDF5 weights file: it has no layer_names attribute")
        layers = []
        for name in group.attrs["layer_names"]:
            name = name.decode() if isinstance(name, bytes) else str(name)
            weight_names = group[name].attrs.get("weight_names", [])
            shapes = [group[name][w.decode() if isinstance(w, bytes) else str(w)].shape for w in weight_names]
            if shapes:
                layers.append((name, shapes))
        return layers


def keras3_layers(path, fmt="keras"):
    """The layers with weights of a Keras 3 `.weights.h5` file, or of the one inside a `.keras`
    archive, by name: {name: weight shapes}."""
    layers = {}
    with contextlib.ExitStack() as stack:
        if fmt == "keras-model":
            archive = stack.enter_context(zipfile.ZipFile(path))
            path = stack.enter_context(archive.open("model.weights.h5"))
        f = stack.enter_context(h5py.File(path, "r"))
        f.visititems(
            lambda key, item: (
                layers.__setitem__(str(item.attrs["name"]), [item[k].shape for k in sorted(item, key=int)])
                if key.endswith("/vars") and "name" in item.attrs and len(item)
                else None
            )
        )
    return layers


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
    """A Keras applications DenseNet file as (canonical state, notes). A legacy `.h5` is read by
    layer order, as Keras loads it, so the Keras 2 builder's names (`conv1/conv`, `fc1000`) and any
    renamed layers are read; a Keras 3 `.weights.h5` by its layer names, as Keras loads it."""
    notes = []
    try:
        if fmt in ("keras", "keras-model"):
            found = keras3_layers(path, fmt)
            if "conv1_conv" not in found or "predictions" not in found:
                raise zoo.ZooError(
                    f"{path} is not a Keras applications DenseNet with its classifier: no "
                    f"{'conv1_conv' if 'conv1_conv' not in found else 'predictions'} layer among "
                    f"{len(found)} layers ({', '.join(list(found)[:6])}, ...)"
                )
            spec = zoo.keras_spec(zoo.keras_block_config(found), found["predictions"][0][-1])
            layers = [(name, found.get(name, [])) for name, _ in zoo.keras_layer_shapes(spec)]
        else:
            layers = keras_layers(path)
            spec = zoo.keras_spec_from_layers(layers, path)
            renamed = [name for (name, _), (ours, _) in zip(layers, zoo.keras_layer_shapes(spec)) if name != ours]
            if renamed:
                notes.append(
                    f"layers matched by order, as Keras loads a legacy .h5: {len(renamed)} of them are not named "
                    f"as Keras 3 names them ({', '.join(renamed[:3])}, ...)"
                )
        zoo.check_keras_layers(layers, spec, path)
        model = keras_application(spec)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Skipping nested container")
            model.load_weights(str(path))
    except zoo.ZooError:
        raise
    except Exception as error:  # h5py's and Keras' errors for a file that is not what it says
        raise zoo.ZooError(f"{path} is not a readable Keras DenseNet weights file: {zoo.reason(error)}") from None
    weights = {layer.name: [w.numpy() for w in layer.weights] for layer in model.layers if layer.weights}
    return zoo.from_keras(weights, spec, str(path)), notes


def write_zoo(path, state, spec, fmt="keras-h5"):
    """A file that `keras.applications.DenseNet121(weights=PATH)` (or the builder) loads."""
    zoo.check_keras_spec(spec, path)
    model = keras_application(spec)
    for name, arrays in zoo.to_keras(state, spec).items():
        model.get_layer(name).set_weights(arrays)
    if fmt == "keras":
        data = bytes_written_by(model.save_weights, ".weights.h5")
    elif fmt == "keras-model":
        data = bytes_written_by(model.save, ".keras")
    else:
        data = bytes_written_by(lambda name: save_legacy_h5(model, name), ".h5")
    atomic_write_bytes(path, data)


def save_legacy_h5(model, path):
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


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
    save_legacy_h5(model, path)
    return np.asarray(model(x_nchw.transpose(0, 2, 3, 1), training=False))
