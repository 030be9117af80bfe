"""DenseNet in Keras 3 on TensorFlow (NHWC).

The d2l chapter's conv_block, DenseBlock, transition_block and DenseNet, grown to any
`DenseNetSpec` (bottleneck or not, compression, ImageNet or CIFAR stem). Layer names are
torchvision's module names (features/denseblock1/denselayer1/norm1, ...), so weights.py maps
them to the canonical keys, and `model.summary()` reads like the paper. Keras layers infer
their input channels when they are built, so the blocks take only their output widths.
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


def conv3x3(num_channels, bias, name, dtype=None):
    # Stride 1 and a 3x3 kernel: 'same' is exactly one pixel of zeros on every side.
    return layers.Conv2D(num_channels, 3, padding="same", use_bias=bias, name=name, dtype=dtype)


def conv1x1(num_channels, bias, name, dtype=None):
    return layers.Conv2D(num_channels, 1, use_bias=bias, name=name, dtype=dtype)


def conv_block(num_channels, bn_size=None, bias=True, name=None, dtype=None):
    """BN-ReLU-Conv(3x3); with `bn_size`, the bottleneck BN-ReLU-Conv(1x1)-BN-ReLU-Conv(3x3)."""
    if bn_size is None:
        return keras.Sequential(
            [
                batch_norm("norm1", dtype),
                layers.ReLU(name="relu1", dtype=dtype),
                conv3x3(num_channels, bias, "conv1", dtype),
            ],
            name=name,
        )
    return keras.Sequential(
        [
            batch_norm("norm1", dtype),
            layers.ReLU(name="relu1", dtype=dtype),
            conv1x1(bn_size * num_channels, bias, "conv1", dtype),
            batch_norm("norm2", dtype),
            layers.ReLU(name="relu2", dtype=dtype),
            conv3x3(num_channels, bias, "conv2", dtype),
        ],
        name=name,
    )


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


def concatenated_shape(shape, new_shape):
    return (*shape[:-1], shape[-1] + new_shape[-1])


@keras.saving.register_keras_serializable(package="densenet_xf")
class DenseBlock(layers.Layer):
    """`num_convs` conv blocks; each one's output is concatenated to its input.
    `memory_efficient` keeps a list of feature maps instead and recomputes each concatenation."""

    def __init__(
        self, num_convs, num_channels, bn_size=None, bias=True, drop_rate=0.0, memory_efficient=False, **kwargs
    ):
        super().__init__(**kwargs)
        self.config = {
            "num_convs": num_convs,
            "num_channels": num_channels,
            "bn_size": bn_size,
            "bias": bias,
            "drop_rate": drop_rate,
            "memory_efficient": memory_efficient,
        }
        self.memory_efficient = memory_efficient
        self.denselayers = [
            conv_block(num_channels, bn_size, bias, f"denselayer{i + 1}", self.dtype_policy) for i in range(num_convs)
        ]
        self.dropout = layers.Dropout(drop_rate, name="dropout", dtype=self.dtype_policy)

    # build and compute_output_shape spare Keras a traced run of call() to learn the shapes.

    def build(self, input_shape):
        for layer in self.denselayers:
            layer.build(input_shape)
            input_shape = concatenated_shape(input_shape, layer.compute_output_shape(input_shape))

    def compute_output_shape(self, input_shape):
        for layer in self.denselayers:
            input_shape = concatenated_shape(input_shape, layer.compute_output_shape(input_shape))
        return input_shape

    def get_config(self):
        return {**super().get_config(), **self.config}

    def call(self, X, training=None):
        if self.memory_efficient:
            return self.call_on_list(X, training)
        for layer in self.denselayers:
            Y = self.dropout(layer(X, training=training), training=training)
            X = ops.concatenate([X, Y], axis=-1)
        return X

    def call_on_list(self, X, training=None):
        features = [X]
        for layer in self.denselayers:
            features.append(self.dropout(checkpointed_layer(layer, features, training), training=training))
        return ops.concatenate(features, axis=-1)


def transition_block(num_channels, bias=True, name=None, dtype=None):
    """BN-ReLU-Conv(1x1) to `num_channels`, then halve height and width."""
    return keras.Sequential(
        [
            batch_norm("norm", dtype),
            layers.ReLU(name="relu", dtype=dtype),
            conv1x1(num_channels, bias, "conv", dtype),
            layers.AveragePooling2D(2, strides=2, name="pool", dtype=dtype),
        ],
        name=name,
    )


def stem(spec, dtype=None):
    """ImageNet: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool. CIFAR: one 3x3 conv.

    The stride-2 layers get explicit symmetric zero padding: 'same' would pad only the
    bottom and right of an even-sized input and shift every output pixel."""
    if spec.stem == "cifar":
        return [conv3x3(spec.num_init_features, spec.conv_bias, "conv0", dtype)]
    return [
        layers.ZeroPadding2D(3, name="conv0_pad", dtype=dtype),
        layers.Conv2D(spec.num_init_features, 7, strides=2, use_bias=spec.conv_bias, name="conv0", dtype=dtype),
        batch_norm("norm0", dtype),
        layers.ReLU(name="relu0", dtype=dtype),
        # Zeros pad exactly like -inf here: the inputs follow a ReLU, so they are all >= 0.
        layers.ZeroPadding2D(1, name="pool0_pad", dtype=dtype),
        layers.MaxPooling2D(3, strides=2, name="pool0", dtype=dtype),
    ]


@keras.saving.register_keras_serializable(package="densenet_xf")
class DenseNet(keras.Model):
    """Built at construction for inputs (None, None, None, in_channels): no dummy call needed."""

    def __init__(self, spec, dtype=None, memory_efficient=False, **kwargs):
        spec = get_spec(spec)
        # autocast=False: Keras would cast any float input to the model's dtype before call(),
        # so a float64 batch would slip silently into a float32 model past validate_input.
        super().__init__(name=spec.name, dtype=dtype, autocast=False, **kwargs)
        self.spec, self.memory_efficient = spec, memory_efficient
        dtype = self.dtype_policy
        features = stem(spec, dtype)
        for stage in channel_plan(spec)[1:]:
            if stage.name.startswith("denseblock"):
                block = DenseBlock(
                    len(stage.layers),
                    spec.growth_rate,
                    spec.bn_size,
                    spec.conv_bias,
                    spec.drop_rate,
                    memory_efficient,
                    name=stage.name,
                    dtype=dtype,
                )
            else:
                block = transition_block(stage.out_channels, spec.conv_bias, stage.name, dtype)
            features.append(block)
        features.append(batch_norm("norm5", dtype))
        self.features = keras.Sequential(features, name="features")
        self.relu = layers.ReLU(name="relu", dtype=dtype)
        self.pool = layers.GlobalAveragePooling2D(name="pool", dtype=dtype)
        self.classifier = layers.Dense(spec.num_classes, name="classifier", dtype=dtype)
        self.build((None, None, None, spec.in_channels))

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

    def call(self, X, training=None):
        validate_input(self.spec, X.shape, dtype_name(X.dtype), "NHWC", self.compute_dtype)
        X = self.relu(self.features(X, training=training))
        return self.classifier(self.pool(X))
