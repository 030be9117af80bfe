import os

import numpy as np
import pytest

from conformance import files, weights
from conformance.specs import ARCHS
from conformance.weights import CheckpointError


def test_init_is_seeded_and_float32():
    a = weights.init_state(ARCHS["tiny"], seed=3)
    b = weights.init_state(ARCHS["tiny"], seed=3)
    c = weights.init_state(ARCHS["tiny"], seed=4)
    assert all(v.dtype == np.float32 for v in a.values())
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert not all(a[k].tobytes() == c[k].tobytes() for k in a)


def test_init_follows_torchvision_scheme():
    state = weights.init_state(ARCHS["densenet121"], seed=0)
    w = state["features.denseblock3.denselayer5.conv2.weight"]
    assert abs(w.std() - np.sqrt(2.0 / (128 * 9))) < 0.05 * np.sqrt(2.0 / (128 * 9))
    assert np.all(state["features.norm5.weight"] == 1) and np.all(state["features.norm5.bias"] == 0)
    assert np.all(state["classifier.bias"] == 0)


def test_randomized_bn_separates_gamma_beta_mean_var():
    state = weights.init_state(ARCHS["tiny"], seed=0, randomize_bn=True)
    gamma, beta = state["features.norm0.weight"], state["features.norm0.bias"]
    mean, var = state["features.norm0.running_mean"], state["features.norm0.running_var"]
    assert gamma.min() >= 0.5 and var.min() >= 0.5 and abs(beta).max() <= 0.5 and abs(mean).max() <= 0.5
    assert not np.allclose(gamma, var)


def test_save_load_round_trip_is_bit_identical(tmp_path):
    spec = ARCHS["tiny_d2l"]
    state = weights.init_state(spec, seed=1, randomize_bn=True)
    path = tmp_path / "w.safetensors"
    weights.save_state(path, state, spec)
    loaded = weights.load_state(path)
    assert set(loaded) == set(state)
    for key in state:
        assert loaded[key].tobytes() == state[key].tobytes()
    assert weights.spec_of_checkpoint(path) == spec


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda s: s.pop("features.norm0.weight"), r"1 missing key\(s\): features.norm0.weight"),
        (
            lambda s: s.__setitem__("features.extra.weight", np.zeros(3, np.float32)),
            r"unexpected key\(s\): features.extra.weight",
        ),
        (
            lambda s: s.__setitem__("classifier.weight", np.zeros((3, 3), np.float32)),
            r"mis-shaped key\(s\): classifier.weight: expected \(5, 16\), got \(3, 3\)",
        ),
    ],
)
def test_bad_state_names_the_keys(damage, match):
    state = weights.init_state(ARCHS["tiny"])
    damage(state)
    with pytest.raises(CheckpointError, match=match):
        weights.validate_state(state, ARCHS["tiny"])


def test_torchvision_batch_counter_is_accepted():
    state = weights.init_state(ARCHS["tiny"])
    state["features.norm0.num_batches_tracked"] = np.array(7)
    assert "features.norm0.num_batches_tracked" not in weights.validate_state(state, ARCHS["tiny"])


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        weights.load_state(path, ARCHS["tiny"])
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        weights.load_state(tmp_path / "missing.safetensors", ARCHS["tiny"])


def test_checkpoint_for_another_arch_is_refused(tmp_path):
    path = tmp_path / "tiny.safetensors"
    weights.save_state(path, weights.init_state(ARCHS["tiny"]), ARCHS["tiny"])
    with pytest.raises(CheckpointError, match="does not fit tiny_d2l"):
        weights.load_state(path, ARCHS["tiny_d2l"])


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "file.bin"
    files.atomic_write_bytes(path, b"old")

    def broken_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
