"""A deliberately broken backend for the conformance runner's own test: PyTorch, except
that it loads the stem convolution's kernels flipped left to right (a layout mistake)."""

import numpy as np

from densenet_torch import backend as torch_backend


class Backend(torch_backend.Backend):
    name = "broken"

    def load_state(self, model, state):
        state = dict(state)
        state["features.conv0.weight"] = np.ascontiguousarray(state["features.conv0.weight"][..., ::-1])
        super().load_state(model, state)
