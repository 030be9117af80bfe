"""Property-based conformance: random valid DenseNet specs and input sizes, built by every
backend, must have the spec's parameter counts and stage shapes and match the NumPy
reference's float64 eval forward.

The default run tries a few fixed (derandomized) examples per backend; `-m slow` many more,
at random. A counterexample hypothesis finds is added below as an `@example`, so it stays a
named regression test.
"""

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the dev extra: pip install -e '.[dev]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conformance import reference, specs  # noqa: E402
from conformance.specs import DenseNetSpec  # noqa: E402
from conformance.suite import checks  # noqa: E402
from conformance.weights import init_state  # noqa: E402

FORWARD_TOLERANCE = checks.TOLERANCES["float64"]["forward_eval"]
COMMON = dict(
    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], database=None
)


@st.composite
def spec_and_size(draw):
    """A small valid spec (every transition keeps at least one channel) and a square input
    size from its minimum to a few pixels above."""
    init = draw(st.integers(1, 12))
    growth = draw(st.integers(1, 6))
    blocks = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    spec = DenseNetSpec(
        "random",
        draw(st.sampled_from(specs.STEMS)),
        init,
        growth,
        blocks,
        bn_size=draw(st.none() | st.integers(1, 4)),
        compression=draw(st.sampled_from((0.5, 1.0, 0.75, 0.34))),
        conv_bias=draw(st.booleans()),
        in_channels=draw(st.integers(1, 3)),
        num_classes=draw(st.integers(1, 7)),
    )
    hypothesis.assume(min(stage.out_channels for stage in specs.channel_plan(spec)) >= 1)
    smallest = specs.min_input_size(spec)
    return spec, draw(st.integers(smallest, smallest + 6))


# Regression examples: found by hypothesis or chosen as corner cases (one block: no
# transition; compression 1.0; a 1x1 final feature map; one class; a cifar stem at its minimum).
CORNERS = [
    (DenseNetSpec("one-block", "imagenet", 1, 1, (1,), None, 0.5, False, 1, 1), 5),
    (DenseNetSpec("min-cifar", "cifar", 3, 2, (2, 1, 1), 2, 1.0, True, 3, 4), 4),
]


def check_against_reference(backend, spec, size, batch=2, seed=0):
    model = backend.build(spec, "float64")
    assert backend.count_params(model) == specs.count_params(spec)
    x = np.random.default_rng(seed).standard_normal((batch, spec.in_channels, size, size))
    native = specs.to_layout(x, backend.layout)
    shapes = {stage: tuple(shape) for stage, shape in backend.stage_shapes(model, native).items()}
    assert shapes == dict(specs.stage_shapes(spec, size, batch, backend.layout))
    state = init_state(spec, seed, randomize_bn=True)
    backend.load_state(model, state)
    logits = backend.forward(model, native, train=False)
    error = checks.relative_error(logits, reference.forward(spec, state, x, train=False))
    assert error <= FORWARD_TOLERANCE, f"{spec} at {size}x{size}: eval forward relative error {error:.3g}"


@pytest.mark.parametrize("spec, size", CORNERS, ids=[spec.name for spec, _ in CORNERS])
def test_corner_specs_match_the_reference(backend, spec, size):
    check_against_reference(backend, spec, size)


@settings(max_examples=3, derandomize=True, **COMMON)
@given(case=spec_and_size())
def test_random_specs_match_the_reference(backend, case):
    check_against_reference(backend, *case)


@pytest.mark.slow
@settings(max_examples=40, **COMMON)
@given(case=spec_and_size(), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_many_random_specs_match_the_reference(backend, case, batch, seed):
    check_against_reference(backend, *case, batch=batch, seed=seed)
