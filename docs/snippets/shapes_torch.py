import torch

from conformance.specs import get_spec, stage_shapes
from densenet_torch import DenseBlock, DenseNet, transition_block

# A dense block of 2 conv blocks with 10 output channels each, on 4 three-channel 8x8 images.
blk = DenseBlock(2, 3, 10)
X = torch.randn(4, 3, 8, 8)
Y = blk(X)
print("DenseBlock output:", tuple(Y.shape))
assert Y.shape == (4, 3 + 2 * 10, 8, 8)

# A transition block: a 1x1 conv to 10 channels, then halve height and width.
blk = transition_block(23, 10)
print("transition_block output:", tuple(blk(Y).shape))
assert blk(Y).shape == (4, 10, 4, 4)

# The chapter's whole network on one 96x96 Fashion-MNIST image, stage by stage.
net = DenseNet("d2l").eval()
X = torch.randn(1, 1, 96, 96)
for name, layer in net.features.named_children():
    X = layer(X)
    print(f"{name:12} {type(layer).__name__:12} output shape: {tuple(X.shape)}")
expected = stage_shapes(get_spec("d2l"), 96, batch=1, layout="NCHW")
assert X.shape == expected["denseblock4"]
print("logits:", tuple(net(torch.randn(1, 1, 96, 96)).shape))
