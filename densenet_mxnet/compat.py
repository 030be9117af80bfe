"""What MXNet 1.9.1 needs before it can be imported here; every module of the package imports
this first, and this module imports mxnet.

MXNet is retired: 1.9.1 is its last release. It was built against NumPy 1.x and Python
<= 3.11, with oneDNN on, and it lowers the OpenMP thread count of the whole process. Each of
those is handled below, once, with the reason next to it.
"""

import importlib.util
import os
import sys

import numpy

# oneDNN trains about 2.9x faster on the CPU (quick recipe, 2 cores: 391 vs 136 examples/s).
# It was once switched off for a concat failure ("could not construct a sub-memory", MXNet
# issue 19586: a first input of under 8 channels); with 1.9.1 and this model's concat order
# (block input first) no check, test or training shape reproduces it, odd widths included.
# MXNet reads this once, when it loads: MXNET_MKLDNN_ENABLED=0 in the environment still wins.
os.environ.setdefault("MXNET_MKLDNN_ENABLED", "1")
# float64 layers, which oneDNN does not take, log a "storage fallback" warning on every call.
os.environ.setdefault("MXNET_STORAGE_FALLBACK_LOG_VERBOSE", "0")


def _removed(name):
    def stub(*args, **kwargs):
        raise NotImplementedError(
            f"numpy.{name} was removed in NumPy 2 (numpy_financial has it); "
            "densenet_mxnet restores the name only so that mxnet can import"
        )

    stub.__name__ = name
    return stub


# Names NumPy 2 removed that mxnet reads while it imports. Restored only where missing, so
# NumPy 1.x is untouched; they stay for the life of the process because mxnet also reads
# some at run time (np.Inf in gluon.contrib.estimator).
NUMPY_1_NAMES = {
    # mxnet/numpy/utils.py re-exports NumPy's constants:
    "PZERO": 0.0,
    "NZERO": -0.0,
    "PINF": numpy.inf,
    "NINF": -numpy.inf,
    "NAN": numpy.nan,
    "NaN": numpy.nan,
    # ... and gluon.contrib.estimator uses np.Inf as a default argument:
    "Inf": numpy.inf,
    # mxnet/numpy_dispatch_protocol.py registers mx.np functions for these NumPy functions:
    "sometrue": numpy.any,
    "round_": numpy.round,
    "product": numpy.prod,
    # mxnet/numpy/fallback.py binds these as fallbacks to official NumPy:
    "alltrue": numpy.all,
    "in1d": lambda a, b, **kwargs: numpy.isin(a, b, **kwargs).ravel(),
    "msort": lambda a: numpy.sort(a, axis=0),
    "trapz": getattr(numpy, "trapezoid", None),  # its NumPy 2 name
    # ... and these financial functions, which moved to the numpy_financial package:
    **{name: _removed(name) for name in ("mirr", "npv", "pmt", "ppmt", "pv", "rate")},
}


def restore_numpy_names(module=numpy):
    """Put back the NumPy 1.x names mxnet reads; returns the names it had to restore."""
    restored = [name for name in NUMPY_1_NAMES if not hasattr(module, name)]
    for name in restored:
        setattr(module, name, NUMPY_1_NAMES[name])
    return restored


def check_distutils():
    # mxnet imports distutils.version, which Python 3.12 dropped; setuptools provides it again.
    if importlib.util.find_spec("distutils") is None:
        raise ModuleNotFoundError(
            "MXNet 1.9.1 imports distutils, which this Python no longer ships: "
            "install setuptools (pip install setuptools) into this environment",
            name="distutils",
        )


def torch_threads():
    """torch's intra-op thread count if torch is already imported, else None."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def restore_torch_threads(count):
    # Loading libmxnet sets the process's OpenMP thread count to 1, which torch (sharing
    # OpenMP) then uses too. Put back what torch had; a torch imported later starts at 1.
    if count is not None:
        sys.modules["torch"].set_num_threads(count)


restore_numpy_names()
check_distutils()
_threads = torch_threads()
import mxnet  # noqa: E402,F401  (the import this module prepares)

restore_torch_threads(_threads)
