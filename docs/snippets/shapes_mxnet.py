import densenet_mxnet  # first: makes MXNet 1.9 importable under NumPy 2
from mxnet import np, npx

npx.set_np()  # MXNet's NumPy interface for this script, as the book's code turns it on

from conformance.specs import get_spec, stage_shapes
from densenet_mxnet import DenseBlock, DenseNet, transition_block

# A dense block of 2 conv blocks with 10 output channels each, on 4 three-channel 8x8 images.
blk = DenseBlock(2, 3, 10)
blk.initialize()
X = np.random.normal(size=(4, 3, 8, 8))
Y = blk(X)
print("DenseBlock output:", Y.shape)
assert Y.shape == (4, 3 + 2 * 10, 8, 8)

# A transition block: a 1x1 conv to 10 channels, then halve height and width.
blk = transition_block(23, 10)
blk.initialize()
print("transition_block output:", blk(Y).shape)
assert blk(Y).shape == (4, 10, 4, 4)

# The chapter's whole network on one 96x96 Fashion-MNIST image, stage by stage.
net = DenseNet("d2l")
net.initialize()
X = np.random.normal(size=(1, 1, 96, 96))
for layer in net.features:
    X = layer(X)
    print(f"{type(layer).__name__:17} output shape: {X.shape}")
expected = stage_shapes(get_spec("d2l"), 96, batch=1, layout="NCHW")
assert X.shape == expected["denseblock4"]
print("logits:", net(np.random.normal(size=(1, 1, 96, 96))).shape)
