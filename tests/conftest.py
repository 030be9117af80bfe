import importlib.util

import numpy as np
import pytest

try:  # before any MXNet import: densenet_mxnet then keeps torch's thread count (a torch
    import torch  # noqa: F401  imported after MXNet would start with one thread)
except ImportError:
    pass
else:
    # PyTorch's CUDA wheels bring Triton, whose LLVM aborts the process ("LLVM ERROR: inconsistency
    # in registered CommandLine options") when it loads after TensorFlow's, as torch.optim loads it;
    # loaded before TensorFlow, both work. Only the tests hold every framework in one process.
    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401

from conformance import data
from conformance.backends import BACKENDS, load_backend
from conformance.interface import BackendUnavailable


def backend_or_skip(name, device="cpu"):
    """The backend's adapter, or a skip that says why its framework is unavailable."""
    try:
        return load_backend(name, device)
    except BackendUnavailable as error:
        pytest.skip(str(error))


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    return backend_or_skip(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def resized_data(size):
    """A module's autouse fixture: Fashion-MNIST resized to `size` once for the whole module, in
    a private cache (assign it to a name in the test module)."""

    @pytest.fixture(scope="module", autouse=True)
    def resized_cache(tmp_path_factory):
        patch = pytest.MonkeyPatch()
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        data.load_resized(size)
        yield
        patch.undo()

    return resized_cache
