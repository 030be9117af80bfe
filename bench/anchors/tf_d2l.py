"""The d2l book's TensorFlow/Keras DenseNet and training loop: the anchor that `make bench`
times the project's TensorFlow trainer against. Imports tensorflow, keras and numpy only.

Kept from the book (chapter "Densely Connected Networks", `d2l.Trainer.fit_epoch` for
TensorFlow): `ConvBlock`, `DenseBlock` and `TransitionBlock` as Keras layers, `block_1` to
`block_3` as one `keras.Sequential`, Keras' default initialisers and BatchNormalization
settings, SGD on sparse categorical cross-entropy, and the book's step: eager, under a
`tf.GradientTape`, with the loss read on the host every step (its plot converts it to NumPy).
`CompiledAnchor` is the same model with the step in a `tf.function`, as a Keras user would
write it for speed. The book's bugs, fixed:
its stride-2 stem conv and max-pool use `padding='same'`, which pads asymmetrically on
even inputs; here explicit symmetric zero padding comes first (zeros are safe before the
max-pool because it follows a ReLU). Its layers call sublayers without `training`, so
Keras BatchNormalization would normalise with its running statistics; here `training` is
passed down. `listLayers.layers` (Keras 2 only) is a plain list, and the classifier
outputs logits (the loss takes `from_logits=True`) rather than a softmax. Added: an
optional 1x1 bottleneck (the paper's DenseNet-B) so the same code also builds densenet121.
"""

import keras
import numpy as np
import tensorflow as tf


class ConvBlock(keras.layers.Layer):
    def __init__(self, num_channels, bn_size=None, bias=True):
        super().__init__()
        self.listLayers = []
        if bn_size:  # DenseNet-B: BN-ReLU-Conv(1x1) to bn_size * growth channels first
            self.listLayers += [
                keras.layers.BatchNormalization(),
                keras.layers.ReLU(),
                keras.layers.Conv2D(bn_size * num_channels, kernel_size=1, use_bias=bias),
            ]
        self.listLayers += [
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(num_channels, kernel_size=(3, 3), padding="same", use_bias=bias),
        ]

    def call(self, x, training=None):
        y = x
        for layer in self.listLayers:
            y = layer(y, training=training)
        return keras.layers.concatenate([x, y], axis=-1)


class DenseBlock(keras.layers.Layer):
    def __init__(self, num_convs, num_channels, bn_size=None, bias=True):
        super().__init__()
        self.listLayers = [ConvBlock(num_channels, bn_size, bias) for _ in range(num_convs)]

    def call(self, x, training=None):
        for layer in self.listLayers:
            x = layer(x, training=training)
        return x


class TransitionBlock(keras.layers.Layer):
    def __init__(self, num_channels, bias=True):
        super().__init__()
        self.batch_norm = keras.layers.BatchNormalization()
        self.relu = keras.layers.ReLU()
        self.conv = keras.layers.Conv2D(num_channels, kernel_size=1, use_bias=bias)
        self.avg_pool = keras.layers.AvgPool2D(pool_size=2, strides=2)

    def call(self, x, training=None):
        x = self.batch_norm(x, training=training)
        x = self.relu(x)
        x = self.conv(x)
        return self.avg_pool(x)


def block_1(num_channels, bias):
    return keras.Sequential(
        [
            keras.layers.ZeroPadding2D(3),
            keras.layers.Conv2D(num_channels, kernel_size=7, strides=2, use_bias=bias),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.ZeroPadding2D(1),
            keras.layers.MaxPool2D(pool_size=3, strides=2),
        ]
    )


def densenet(
    num_channels=64, growth_rate=32, arch=(4, 4, 4, 4), in_channels=1, num_classes=10, bn_size=None, bias=True
):
    net = block_1(num_channels, bias)
    for i, num_convs in enumerate(arch):
        net.add(DenseBlock(num_convs, growth_rate, bn_size, bias))
        num_channels += num_convs * growth_rate
        if i != len(arch) - 1:  # a transition layer halves the channels between dense blocks
            num_channels //= 2
            net.add(TransitionBlock(num_channels, bias))
    net.add(keras.layers.BatchNormalization())
    net.add(keras.layers.ReLU())
    net.add(keras.layers.GlobalAvgPool2D())
    net.add(keras.layers.Flatten())
    net.add(keras.layers.Dense(num_classes))
    net.build((None, None, None, in_channels))
    return net


def pick_device(device):
    if device == "gpu" and tf.config.list_physical_devices("GPU"):
        return "/GPU:0", ""
    return "/CPU:0", ("TensorFlow sees no GPU; ran on the CPU" if device == "gpu" else "")


class Anchor:
    """The book's net and its eager SGD step on `device` ("cpu" or "gpu")."""

    def __init__(self, arch, lr, device="cpu"):
        self.device, self.note = pick_device(device)
        with tf.device(self.device):
            self.net = densenet(**arch)
            self.optimizer = keras.optimizers.SGD(learning_rate=lr)
        self.loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @property
    def device_name(self):
        if self.device == "/CPU:0":
            return "cpu"
        details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
        return f"GPU:0 {details.get('device_name', '')}".strip()

    def num_params(self):
        return sum(int(np.prod(w.shape)) for w in self.net.trainable_weights)

    def train_step(self, images, y):
        X = tf.cast(images, tf.float32)[..., None] / 255
        with tf.GradientTape() as tape:
            l = self.loss(y, self.net(X, training=True))
        grads = tape.gradient(l, self.net.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.net.trainable_variables))
        return l

    def step(self, images, labels):
        """One SGD step on uint8 (N, H, W) images; its mean loss, read on the host."""
        with tf.device(self.device):
            return float(self.train_step(tf.constant(images), tf.constant(labels)))

    def logits(self, images):
        with tf.device(self.device):
            return self.net(tf.cast(images, tf.float32)[..., None] / 255, training=False).numpy()

    def wait(self):
        """Until the last update has run: the loss read back was computed before it."""
        tf.test.experimental.sync_devices()


class CompiledAnchor(Anchor):
    """The book's net with its step compiled into a `tf.function` graph."""

    @tf.function
    def train_step(self, images, y):
        return Anchor.train_step(self, images, y)


def gpu_peak_bytes():
    """TensorFlow's allocator peak on GPU:0; None on the CPU."""
    if not tf.config.list_physical_devices("GPU"):
        return None
    return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])


def gpu_bytes_in_use():
    if not tf.config.list_physical_devices("GPU"):
        return None
    return int(tf.config.experimental.get_memory_info("GPU:0")["current"])


def gpu_reset_peak():
    if tf.config.list_physical_devices("GPU"):
        tf.config.experimental.reset_memory_stats("GPU:0")


def versions():
    return {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__}
