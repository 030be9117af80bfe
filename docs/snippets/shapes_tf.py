import densenet_tf  # first: makes Keras 3 run on TensorFlow
import tensorflow as tf

from conformance.specs import get_spec, stage_shapes
from densenet_tf import DenseBlock, DenseNet, transition_block

# A dense block of 2 conv blocks with 10 output channels each, on 4 three-channel 8x8 images.
# NHWC; Keras layers infer their input channels, so the block takes only its growth.
blk = DenseBlock(2, 10)
X = tf.random.normal((4, 8, 8, 3))
Y = blk(X)
print("DenseBlock output:", tuple(Y.shape))
assert Y.shape == (4, 8, 8, 3 + 2 * 10)

# A transition block: a 1x1 conv to 10 channels, then halve height and width.
blk = transition_block(10)
print("transition_block output:", tuple(blk(Y).shape))
assert blk(Y).shape == (4, 4, 4, 10)

# The chapter's whole network on one 96x96 Fashion-MNIST image, stage by stage.
net = DenseNet("d2l")
X = tf.random.normal((1, 96, 96, 1))
for layer in net.features.layers:
    X = layer(X, training=False)
    print(f"{layer.name:12} {type(layer).__name__:19} output shape: {tuple(X.shape)}")
expected = stage_shapes(get_spec("d2l"), 96, batch=1, layout="NHWC")
assert tuple(X.shape) == expected["denseblock4"]
print("logits:", tuple(net(tf.random.normal((1, 96, 96, 1)), training=False).shape))
