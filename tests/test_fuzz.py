"""Every weights reader fuzzed: random bytes, truncations and bit flips of real small files.

Each case must end in a valid (spec, state) or in our own error (`CheckpointError`, which the
CLI turns into one line and exit 2), within bounded time and memory: never another exception.
A bounded number of cases per format runs by default; `-m slow` runs many more.
"""

import resource
import time

import numpy as np
import pytest
from conftest import backend_or_skip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance import specs, zoo
from conformance.cli import main
from conformance.weights import CheckpointError, init_state

SECONDS_PER_CASE = 20.0  # a Keras file that still opens builds a Keras model: about 1 s on 2 cores
MEMORY_GROWTH_MB = 2048  # peak resident memory the whole fuzz run may add
DEFAULT_CASES, SLOW_CASES = 12, 150
SLOW_KERAS_CASES = 40  # a damaged Keras file that still opens costs a Keras model build, 1-3 s

KERAS_SPEC = zoo.keras_spec((1, 1, 1, 1), 3)
GLUON_SPEC = specs.DenseNetSpec("gluon_small", "imagenet", 8, 4, (1, 1), 2, 0.5, False, 3, 5)
# suffix -> (framework the reader needs, spec written)
FILES = {
    "safetensors": (None, specs.get_spec("tiny")),
    "pth": ("torch", specs.get_spec("tiny")),
    "legacy.pth": ("torch", specs.get_spec("tiny")),  # torch.save's pre-1.6 format, torchvision's published files
    "params": ("mxnet", GLUON_SPEC),
    "h5": ("tf", KERAS_SPEC),
    "weights.h5": ("tf", KERAS_SPEC),
    "keras": ("tf", KERAS_SPEC),  # a zip archive holding model.weights.h5 and the model's config
}


def write_real(path, suffix):
    framework, spec = FILES[suffix]
    if framework:
        backend_or_skip(framework)
    state = init_state(spec, seed=1, randomize_bn=True)
    if suffix == "legacy.pth":
        import torch

        tensors = {key: torch.from_numpy(value) for key, value in zoo.to_torchvision(state, legacy=True).items()}
        torch.save(tensors, path, _use_new_zipfile_serialization=False)
    else:
        zoo.write_weights(path, state, spec)
    return path.read_bytes()


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    return folder, {}


def real_bytes(real_files, suffix):
    folder, cache = real_files
    if suffix not in cache:
        cache[suffix] = write_real(folder / f"real.{suffix}", suffix)
    return cache[suffix]


@st.composite
def damaged(draw, data: bytes):
    """Random bytes, a truncation, or up to 8 bit flips of `data` (most of them near the start,
    where the headers are)."""
    kind = draw(st.sampled_from(["random", "truncated", "flipped"]))
    if kind == "random":
        return kind, draw(st.binary(min_size=0, max_size=512))
    if kind == "truncated":
        return kind, data[: draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))  # positions uniform, not shrunk towards 0
    head = min(len(data), 4096)
    for _ in range(draw(st.integers(1, 8))):
        where = int(rng.integers(0, head if rng.random() < 0.5 else len(data)))
        out[where] ^= 1 << int(rng.integers(0, 8))
    return kind, bytes(out)


def check_reader(tmp_path, suffix, kind, data):
    path = tmp_path / f"fuzz.{suffix}"
    path.write_bytes(data)
    start = time.perf_counter()
    try:
        spec, state = zoo.read_weights(path)
    except CheckpointError as error:
        message = str(error)
        assert str(path) in message and "\n" not in message and "\x1b" not in message, (kind, message)
    else:  # a flip that left the file valid: what came back is a whole, valid state
        assert set(state) == set(specs.parameter_table(spec)), kind
    assert time.perf_counter() - start < SECONDS_PER_CASE, kind


def fuzz(suffix, cases, tmp_path, real_files):
    """Run `cases` damaged versions of the real file through the reader (hypothesis draws them)."""
    real = real_bytes(real_files, suffix)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @settings(
        max_examples=cases,
        deadline=None,
        derandomize=cases == DEFAULT_CASES,  # the default run is the same every time
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
        print_blob=False,
    )
    @given(st.data())
    def run(data):
        kind, damaged_bytes = data.draw(damaged(real), label="damage")
        check_reader(tmp_path, suffix, kind, damaged_bytes)

    run()
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < MEMORY_GROWTH_MB


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("suffix", list(FILES))
def test_fuzzed_files_end_in_our_error(suffix, tmp_path, real_files):
    fuzz(suffix, DEFAULT_CASES, tmp_path, real_files)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("suffix", list(FILES))
def test_fuzzed_files_end_in_our_error_many(suffix, tmp_path, real_files):
    fuzz(suffix, SLOW_KERAS_CASES if suffix.endswith(("h5", "keras")) else SLOW_CASES, tmp_path, real_files)


@pytest.mark.parametrize("suffix", list(FILES))
def test_cli_on_a_damaged_file_exits_2_with_one_line(suffix, tmp_path, real_files, capsys):
    data = real_bytes(real_files, suffix)
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[: len(data) // 3])
    assert main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("densenet-xf convert: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_params_header_claiming_gigabytes_is_refused_before_mxnet_allocates(tmp_path, real_files):
    """MXNet allocates what an array's header claims before reading it: a flipped bit in a shape
    once cost 12 GB and 20 s. The sizes are checked first."""
    data = bytearray(real_bytes(real_files, "params"))
    data[24 + 12 : 24 + 20] = (2**40).to_bytes(8, "little")  # array 0's first dimension
    path = tmp_path / "huge.params"
    path.write_bytes(bytes(data))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"array 0 claims \d+ bytes of data where \d+ remain"):
        zoo.read_weights(path)
    assert time.perf_counter() - start < 1.0
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 100
