from functools import partial

import jax
import jax.numpy as jnp

from conformance.specs import get_spec, stage_shapes
from densenet_jax import DenseBlock, DenseNet, TransitionBlock

key = jax.random.key(0)

# A dense block of 2 conv blocks with 10 output channels each, on 4 three-channel 8x8 images.
# NHWC; Flax modules hold no state: init_with_output returns (output, variables).
X = jax.random.normal(key, (4, 8, 8, 3))
Y, variables = DenseBlock(2, 10).init_with_output(key, X, train=False)
print("DenseBlock output:", Y.shape)
assert Y.shape == (4, 8, 8, 3 + 2 * 10)

# A transition block: a 1x1 conv to 10 channels, then halve height and width.
Z, _ = TransitionBlock(10).init_with_output(key, Y, train=False)
print("TransitionBlock output:", Z.shape)
assert Z.shape == (4, 4, 4, 10)

# The chapter's whole network on one 96x96 Fashion-MNIST image, stage by stage:
# capture_intermediates records every submodule's output; jax.eval_shape traces the
# network and returns only shapes and dtypes, without computing (or compiling) anything.
X = jax.ShapeDtypeStruct((1, 96, 96, 1), jnp.float32)
init = partial(DenseNet("d2l").init_with_output, train=False, capture_intermediates=True)
logits, variables = jax.eval_shape(init, key, X)
stages = variables["intermediates"]
print(f"{'stem':12} output shape: {stages['stem'][0].shape}")
for name in ("denseblock1", "transition1", "denseblock2", "transition2",
             "denseblock3", "transition3", "denseblock4"):
    print(f"{name:12} output shape: {stages[name]['__call__'][0].shape}")
expected = stage_shapes(get_spec("d2l"), 96, batch=1, layout="NHWC")
assert stages["denseblock4"]["__call__"][0].shape == expected["denseblock4"]
print("logits:", logits.shape)
