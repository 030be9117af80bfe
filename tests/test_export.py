"""Each backend with its framework's own save/trace/export tooling, and ONNX through onnxruntime.

Every round trip must reproduce the original model's logits. The ONNX exports of all four
backends (tens of seconds each on a CPU) are under `slow`; `make conformance` runs them too.
"""

import numpy as np
import pytest
from conftest import backend_or_skip

from conformance import export, specs, weights
from conformance.cli import main
from conformance.specs import InputError
from conformance.suite import checks
from conformance.suite import onnx as onnx_matrix

ARCH, SIZE = "tiny", 32


def loaded(name):
    """(backend, a tiny model with canonical random weights, an input batch in its layout)."""
    backend = backend_or_skip(name)
    spec = specs.get_spec(ARCH)
    model = backend.build(spec)
    backend.load_state(model, weights.init_state(spec, seed=3, randomize_bn=True))
    x = specs.to_layout(checks.make_batch(spec, SIZE, 3, seed=5)[0], backend.layout)
    return backend, model, x


def assert_same_logits(actual, expected, tolerance=1e-6):
    assert checks.relative_error(actual, expected) <= tolerance


# torch.export takes about 15 s on 2 CPU cores.
@pytest.mark.parametrize("name", [pytest.param("torch", marks=pytest.mark.slow), "tf", "jax", "mxnet"])
def test_native_format_round_trip(name, tmp_path):
    backend, model, x = loaded(name)
    expected = backend.forward(model, x, train=False)
    exporter = export.backend_exporter(backend)
    path = tmp_path / f"model{exporter.NATIVE_SUFFIX}"
    exporter.save_native(model, path, SIZE)
    # XLA compiles jax.export's function with its weights as constants, and may fold them
    # differently from the jitted apply: float32 rounding, not bit-identical.
    assert_same_logits(exporter.load_native(path)(x), expected)


def test_torch_fx_trace_keeps_the_input_check():
    _, model, x = loaded("torch")
    torch = pytest.importorskip("torch")
    traced = torch.fx.symbolic_trace(model.eval())
    X = torch.from_numpy(x)
    assert torch.equal(traced(X), model(X))
    with pytest.raises(InputError, match="looks like NHWC"):
        traced(X.permute(0, 2, 3, 1))


def test_torch_script_reproduces_logits():
    _, model, x = loaded("torch")
    torch = pytest.importorskip("torch")
    X = torch.from_numpy(x)
    assert torch.equal(torch.jit.script(model.eval())(X), model(X))


def test_keras_load_model_restores_class_spec_and_dtype(tmp_path):
    backend, _, _ = loaded("tf")
    keras = pytest.importorskip("keras")
    model = backend.build(ARCH, "float64")
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    assert type(restored) is type(model) and restored.spec == model.spec
    assert restored.dtype_policy.name == "float64"
    assert [v.path for v in restored.weights] == [v.path for v in model.weights]


def test_keras_saved_model_export_reproduces_logits(tmp_path):
    backend, model, x = loaded("tf")
    tf = pytest.importorskip("tensorflow")
    expected = backend.forward(model, x, train=False)  # Keras exports only a model that has been called
    model.export(str(tmp_path / "saved"), verbose=False)
    saved = tf.saved_model.load(str(tmp_path / "saved"))  # keep it: .serve alone lets its variables go
    assert_same_logits(saved.serve(x).numpy(), expected)


@pytest.mark.slow  # about 10 s on 2 CPU cores
def test_keras_compile_and_fit_with_the_model_as_is():
    _, model, x = loaded("tf")
    keras = pytest.importorskip("keras")
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    before = [v.numpy().copy() for v in model.trainable_variables]
    history = model.fit(x, np.array([0, 1, 2]), epochs=1, batch_size=3, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))


@pytest.mark.slow  # about 20 s of XLA compiling on 2 CPU cores
def test_jax_export_of_train_mode_apply_round_trips():
    backend, model, x = loaded("jax")
    jax = pytest.importorskip("jax")

    def train_apply(variables, X):
        return model.module.apply(variables, X, train=True, mutable=["batch_stats"])

    exported = jax.export.export(jax.jit(train_apply))(model.variables, x)
    restored = jax.export.deserialize(exported.serialize())
    (logits, stats), (expected_logits, expected_stats) = (
        restored.call(model.variables, x),
        train_apply(model.variables, x),
    )
    assert_same_logits(logits, expected_logits)  # compiled vs eager: float32 rounding
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(expected_stats)):
        assert_same_logits(a, b)


def test_mxnet_symbol_block_keeps_hybridized_logits(tmp_path):
    backend, model, x = loaded("mxnet")
    exporter = export.backend_exporter(backend)
    expected = backend.forward(model, x, train=False)
    exporter.save_native(model, tmp_path / "model", SIZE)  # hybridizes the model
    assert (tmp_path / "model-symbol.json").is_file() and (tmp_path / "model-0000.params").is_file()
    assert_same_logits(backend.forward(model, x, train=False), expected, 0.0)


# Through the command line, as a user runs it: every backend, both formats. The slowest
# (JAX's ONNX conversion, torch.export) take 5-10 s each on 2 CPU cores.
CLI_CASES = [
    pytest.param(name, fmt, marks=pytest.mark.slow) if (name, fmt) in {("jax", "onnx")} else (name, fmt)
    for name in ("torch", "tf", "jax", "mxnet")
    for fmt in export.FORMATS
]


@pytest.mark.parametrize("name,fmt", CLI_CASES)
def test_cli_export_every_backend_and_format(name, fmt, tmp_path, capsys):
    backend, model, x = loaded(name)
    exporter = export.backend_exporter(backend)
    if fmt == "onnx":
        onnx = pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    checkpoint = tmp_path / "model.safetensors"
    weights.save_state(checkpoint, backend.export_state(model), specs.get_spec(ARCH))
    out = tmp_path / ("m.onnx" if fmt == "onnx" else f"m{exporter.NATIVE_SUFFIX}")
    argv = ["export", "--backend", name, "--format", fmt, "--size", str(SIZE), str(checkpoint), str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert f'"format": "{fmt}"' in capsys.readouterr().out
    expected = backend.forward(model, x, train=False)
    if fmt == "onnx":
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
        assert_same_logits(onnx_matrix.run_onnx(out, x), expected)
    else:
        assert_same_logits(exporter.load_native(out)(x), expected)


def test_cli_export_needs_a_size(tmp_path, capsys):
    backend, model, _ = loaded("mxnet")
    checkpoint = tmp_path / "model.safetensors"
    weights.save_state(checkpoint, backend.export_state(model), model.spec)
    assert main(["export", "--backend", "mxnet", str(checkpoint), str(tmp_path / "m.onnx")]) == 2
    assert "records no input size; pass --size" in capsys.readouterr().err


@pytest.mark.slow
def test_onnx_graphs_of_all_backends_agree(tmp_path):
    pytest.importorskip("onnxruntime")
    results = {}
    for name in ("torch", "tf", "jax", "mxnet"):
        results[name] = {"onnx": onnx_matrix.measure(backend_or_skip(name), tmp_path)}
    section = onnx_matrix.section(results)
    assert section["failures"] == []
    tolerance = onnx_matrix.onnx_tolerance()[0]
    assert section["tolerance"] == tolerance < 1e-5  # derived: 2 x 10 x the reference's own float32 error
    assert all(len(row) == 4 and max(row.values()) <= tolerance for row in section["errors"].values())


def test_an_exporter_whose_package_is_missing_is_skipped_not_failed(tmp_path, monkeypatch):
    """A machine without onnxscript or jax2onnx (the offline GPU machine) reports the export as
    skipped, as a missing framework is, and the conformance verdict does not fail on it."""

    def missing(backend):
        raise ModuleNotFoundError("No module named 'jax2onnx'", name="jax2onnx")

    monkeypatch.setattr(onnx_matrix, "backend_exporter", missing)
    from conformance.backends import load_backend

    measured = onnx_matrix.measure(load_backend("reference"), tmp_path)
    assert "error" not in measured and "jax2onnx" in measured["skipped"]
    section = onnx_matrix.section({"reference": {"onnx": measured}})
    assert section["failures"] == [] and "jax2onnx" in section["export_skipped"]["reference"]
    assert any("skipped: No module named 'jax2onnx'" in line for line in onnx_matrix.markdown(section))
