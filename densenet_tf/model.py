"""DenseNet in Keras 3 on TensorFlow (NHWC).

The d2l chapter's conv_block, DenseBlock, transition_block and DenseNet, grown to any
`DenseNetSpec` (bottleneck or not, compression, ImageNet or CIFAR stem). Layer names are
torchvision's module names (features/denseblock1/denselayer1/norm1, ...), so weights.py maps
them to the canonical keys, and `model.summary()` reads like the paper. Keras layers infer
their input channels when they are built, so the blocks take only their output widths. The
chapter's four come first; the extensions after them (memory-efficient recomputation, the input
check) are what torchvision's DenseNet adds, and the Keras engineering (shapes without a traced
call, saving) sits in the two base classes beside them.
"""

import keras
from keras import layers, ops

from conformance.specs import DenseNetSpec, channel_plan, get_spec, validate_input

if keras.backend.backend() != "tensorflow":
    raise ImportError(f"densenet_tf needs Keras on TensorFlow, but KERAS_BACKEND is {keras.backend.backend()!r}")

BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # Keras' convention: weight of the running statistic (PyTorch's 0.1)


def dtype_name(dtype):
    return keras.backend.standardize_dtype(dtype)


def batch_norm(name, dtype=None):
    return layers.BatchNormalization(axis=-1, epsilon=BN_EPS, momentum=BN_MOMENTUM, name=name, dtype=dtype)


def conv(num_channels, kernel_size, bias=True, stride=1, name=None, dtype=None):
    """At stride 1, 'same' pads kernel_size // 2 on every side; the stem pads its stride-2 conv itself."""
    padding = "same" if stride == 1 else "valid"
    return layers.Conv2D(num_channels, kernel_size, stride, padding, use_bias=bias, name=name, dtype=dtype)


def conv_block(num_channels, bn_size=None, bias=True, name=None, dtype=None):
    """BN-ReLU-Conv(3x3); with `bn_size`, the bottleneck BN-ReLU-Conv(1x1)-BN-ReLU-Conv(3x3)."""
    if bn_size is None:
        return keras.Sequential(
            [
                batch_norm("norm1", dtype),
                layers.ReLU(name="relu1", dtype=dtype),
                conv(num_channels, 3, bias, name="conv1", dtype=dtype),
            ],
            name=name,
        )
    return keras.Sequential(
        [
            batch_norm("norm1", dtype),
            layers.ReLU(name="relu1", dtype=dtype),
            conv(bn_size * num_channels, 1, bias, name="conv1", dtype=dtype),
            batch_norm("norm2", dtype),
            layers.ReLU(name="relu2", dtype=dtype),
            conv(num_channels, 3, bias, name="conv2", dtype=dtype),
        ],
        name=name,
    )


def concatenated_shape(shape, new_shape):
    return (*shape[:-1], shape[-1] + new_shape[-1])


class ConcatenatingLayer(layers.Layer):
    """Keras engineering for DenseBlock: the shapes of its blocks (`self.blks`), each fed the
    concatenation so far, computed without a traced run of call()."""

    def build(self, input_shape):
        for blk in self.blks:
            blk.build(input_shape)
            input_shape = concatenated_shape(input_shape, blk.compute_output_shape(input_shape))

    def compute_output_shape(self, input_shape):
        for blk in self.blks:
            input_shape = concatenated_shape(input_shape, blk.compute_output_shape(input_shape))
        return input_shape


@keras.saving.register_keras_serializable(package="densenet_xf")
class DenseBlock(ConcatenatingLayer):
    """`num_convs` conv blocks; each one's output is concatenated to its input."""

    def __init__(self, num_convs, num_channels, bn_size=None, bias=True, drop_rate=0.0, **kwargs):
        super().__init__(**kwargs)
        names = [f"denselayer{i + 1}" for i in range(num_convs)]
        self.blks = [conv_block(num_channels, bn_size, bias, name, self.dtype_policy) for name in names]
        self.dropout = layers.Dropout(drop_rate, name="dropout", dtype=self.dtype_policy)

    def call(self, X, training=None):
        for blk in self.blks:
            Y = self.dropout(blk(X, training=training), training=training)  # torchvision's drop_rate (0: none)
            X = ops.concatenate([X, Y], axis=-1)  # concatenate the input and output of each block on the channels
        return X


def transition_block(num_channels, bias=True, name=None, dtype=None):
    """BN-ReLU-Conv(1x1) to `num_channels`, then halve height and width."""
    return keras.Sequential(
        [
            batch_norm("norm", dtype),
            layers.ReLU(name="relu", dtype=dtype),
            conv(num_channels, 1, bias, name="conv", dtype=dtype),
            layers.AveragePooling2D(2, strides=2, name="pool", dtype=dtype),
        ],
        name=name,
    )


def stem(spec, dtype=None):
    """ImageNet: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool. CIFAR: one 3x3 conv.

    The stride-2 layers get explicit symmetric zero padding: 'same' would pad only the
    bottom and right of an even-sized input and shift every output pixel."""
    if spec.stem == "cifar":
        return [conv(spec.num_init_features, 3, spec.conv_bias, name="conv0", dtype=dtype)]
    return [
        layers.ZeroPadding2D(3, name="conv0_pad", dtype=dtype),
        conv(spec.num_init_features, 7, spec.conv_bias, stride=2, name="conv0", dtype=dtype),
        batch_norm("norm0", dtype),
        layers.ReLU(name="relu0", dtype=dtype),
        # Zeros pad exactly like -inf here: the inputs follow a ReLU, so they are all >= 0.
        layers.ZeroPadding2D(1, name="pool0_pad", dtype=dtype),
        layers.MaxPooling2D(3, strides=2, name="pool0", dtype=dtype),
    ]


class ModelFromSpec(keras.Model):
    """Keras engineering for DenseNet: built for inputs (None, None, None, in_channels) at
    construction (no dummy call needed), and saved by its spec, dtype and memory_efficient."""

    def build(self, input_shape):
        for layer in (self.features, self.relu, self.pool, self.classifier):
            layer.build(input_shape)
            input_shape = layer.compute_output_shape(input_shape)

    def get_config(self):
        return {
            "spec": self.spec.to_json(),
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "memory_efficient": self.memory_efficient,
        }

    @classmethod
    def from_config(cls, config):
        return cls(
            DenseNetSpec.from_json(config["spec"]),
            dtype=keras.dtype_policies.deserialize(config["dtype"]),
            memory_efficient=config.get("memory_efficient", False),
        )


@keras.saving.register_keras_serializable(package="densenet_xf")
class DenseNet(ModelFromSpec):
    """Any spec (or its name): the stem, dense blocks with transition blocks between them,
    then BN, ReLU, global average pooling and a dense classifier."""

    def __init__(self, spec, dtype=None, memory_efficient=False, **kwargs):
        spec = get_spec(spec)
        # autocast=False: Keras would cast a float64 batch to a float32 model's dtype, past check_input.
        super().__init__(name=spec.name, dtype=dtype, autocast=False, **kwargs)
        self.spec, self.memory_efficient, dtype = spec, memory_efficient, self.dtype_policy
        dense_block = MemoryEfficientDenseBlock if memory_efficient else DenseBlock
        features = stem(spec, dtype)
        for stage in channel_plan(spec)[1:]:  # the widths of every stage, from the spec
            if stage.name.startswith("denseblock"):
                args = spec.growth_rate, spec.bn_size, spec.conv_bias, spec.drop_rate
                features.append(dense_block(len(stage.layers), *args, name=stage.name, dtype=dtype))
            else:
                features.append(transition_block(stage.out_channels, spec.conv_bias, stage.name, dtype))
        features.append(batch_norm("norm5", dtype))
        self.features = keras.Sequential(features, name="features")
        self.relu = layers.ReLU(name="relu", dtype=dtype)
        self.pool = layers.GlobalAveragePooling2D(name="pool", dtype=dtype)
        self.classifier = layers.Dense(spec.num_classes, name="classifier", dtype=dtype)
        self.build((None, None, None, spec.in_channels))

    def call(self, X, training=None):
        check_input(self.spec, X, self.compute_dtype)
        X = self.relu(self.features(X, training=training))
        return self.classifier(self.pool(X))


# Extensions: what torchvision's DenseNet adds to the chapter's.


def check_input(spec, X, dtype):
    """A clear error for a batch the model cannot take (NCHW, wrong channels or size, wrong dtype)."""
    validate_input(spec, X.shape, dtype_name(X.dtype), "NHWC", dtype)


@keras.saving.register_keras_serializable(package="densenet_xf")
class MemoryEfficientDenseBlock(DenseBlock):
    """torchvision's memory_efficient: the same block and variables, keeping the list of feature
    maps instead of their concatenation, which each layer recomputes in the backward pass."""

    def call(self, X, training=None):
        features = [X]
        for blk in self.blks:
            features.append(self.dropout(checkpointed_layer(blk, features, training), training=training))
        return ops.concatenate(features, axis=-1)


def checkpointed_layer(layer, features, training=None):
    """One dense layer on the list of feature maps, its concatenation and first BN-ReLU-Conv
    recomputed in the backward pass (torchvision's `_DenseLayer.bn_function`)."""
    norm1, relu1, conv1, *rest = layer.layers
    if not (training and norm1.trainable):  # no tape to spare, no statistics to move
        return layer(ops.concatenate(features, axis=-1), training=training)
    statistics = norm1.non_trainable_variables  # moving_mean, moving_variance

    @keras.remat
    def bn_function(*features):
        # keras.remat (tf.recompute_grad here) runs this again in the backward pass, assignments
        # too: the scope holds the moving averages back, and the forward's are applied below.
        with keras.StatelessScope() as scope:
            Y = conv1(relu1(norm1(ops.concatenate(features, axis=-1), training=True)))
        return Y, *(scope.get_current_value(v) for v in statistics)

    Y, *moved = bn_function(*features)
    for variable, value in zip(statistics, moved):
        variable.assign(value)
    for sublayer in rest:
        Y = sublayer(Y, training=training)
    return Y
