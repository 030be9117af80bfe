"""`densenet-xf conformance` end to end, on the tiny matrix without training."""

import json
from pathlib import Path

import pytest

from conformance import backends
from conformance.suite import runner

pytest.importorskip("torch", reason="the runner test uses the PyTorch backend")


@pytest.fixture
def with_broken_backend(monkeypatch):
    monkeypatch.setenv(backends.EXTRA_BACKENDS_ENV, "broken=broken_backend")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent) + ":" + str(Path(__file__).parents[1]))


def test_broken_backend_fails_the_run_naming_backend_and_check(tmp_path, with_broken_backend, capsys):
    code = runner.run(tmp_path, backends=["torch", "broken"], matrix="tiny", recipe="", jobs=2)  # concurrently
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 1 and not report["passed"]
    assert any(f.startswith("broken: tiny@19 float32 forward_eval: error") for f in report["failures"])
    assert not any(f.startswith("torch:") for f in report["failures"])
    assert "broken: tiny@19 float32 forward_eval" in out and "VERDICT: FAILED" in out
    assert report["memory_efficient"] == [list(config) for config in runner.MEMORY_EFFICIENT]
    assert any(f.startswith("broken: tiny@19 memory-efficient float32 forward_eval: error") for f in report["failures"])
    efficient = [row for row in report["rows"] if row["config"].endswith(" memory-efficient")]
    assert {row["config"] for row in efficient} == {
        f"{c.arch}@{c.size} memory-efficient" for c in runner.MEMORY_EFFICIENT
    }
    assert {(row["dtype"], row["check"]) for row in efficient} >= {
        ("float64", "running_stats_update"),
        ("float32", "gradients"),
    }
    assert all(row["results"]["torch"]["passed"] for row in efficient)
    assert "| tiny_d2l@13 memory-efficient float64 running_stats_update |" in (tmp_path / "report.md").read_text()
    trainer = [row for row in report["rows"] if row["config"] == "tiny_d2l@13 trainer"]  # the arithmetic modes
    assert {row["dtype"] for row in trainer} == {"fp32", "tf32", "bf16"}
    assert all(row["results"]["torch"]["passed"] for row in trainer)
    assert any(f.startswith("broken: tiny_d2l@13 trainer fp32 sgd_update: error") for f in report["failures"])
    conditioning = report["float32_gradient_sensitivity"]["tiny@19"]  # the derived float32 tolerances
    gradients = next(row for row in report["rows"] if row["config"] == "tiny@19" and row["check"] == "gradients")
    assert gradients["dtype"] == "float32" and gradients["tolerance"] == conditioning["tolerance"]["gradients"]
    assert report["cross"]["errors"]["torch"]["torch"] == 0.0
    assert report["cross"]["errors"]["broken"]["torch"] > report["cross"]["tolerance"]  # broken loads torch's export
    for name in ("report.md", "errors.png", "cross_backend.png", "torch.json", "broken.json"):
        assert (tmp_path / name).is_file(), name


def test_missing_and_crashing_backends_are_reported_not_passed(tmp_path, with_broken_backend, monkeypatch):
    monkeypatch.setenv(backends.EXTRA_BACKENDS_ENV, "ghost=ghost_backend,crash=conformance.no_such_module")
    code = runner.run(tmp_path, backends=["crash", "ghost", "torch"], matrix="tiny", recipe="")
    report = json.loads((tmp_path / "report.json").read_text())
    status = {name: b["status"] for name, b in report["backends"].items()}
    assert code == 1 and status == {"crash": "error", "ghost": "skipped", "torch": "ok"}
    assert "no_such_framework_xyz" in report["backends"]["ghost"]["reason"]
    assert report["failures"] == [f for f in report["failures"] if f.startswith("crash: checks failed")] != []

    code = runner.run(tmp_path / "all", backends=["ghost"], matrix="tiny", recipe="", require_all=True)
    assert code == 1


def test_gpu_run_without_a_gpu_falls_back_with_a_note(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = runner.run(tmp_path, device="gpu", backends=["torch"], matrix="tiny", recipe="")
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0 and report["device"] == "gpu"
    assert report["backends"]["torch"]["device"] == "cpu"
    assert "no CUDA device; ran on the CPU" in report["backends"]["torch"]["device_note"]
    assert "no CUDA device" in (tmp_path / "report.md").read_text()


def test_the_report_says_which_configs_skip_the_step_and_float32_training():
    from conformance.suite import report

    notes = report._matrix_notes([list(config) for config in runner.MATRICES["default"]])
    assert "not rebuilt for densenet_bc100_k12@32, densenet121@64" in notes
    assert "densenet_bc100_k12@32, densenet121@64: float32 checks the eval pass" in notes
    assert report._matrix_notes([["tiny", 19, 4]]) == ""  # old four- and three-field matrices still read
    assert "but the trainer's step (make test steps it)" in report._step_words(
        [list(config) for config in runner.MEMORY_EFFICIENT]
    )
    assert report._step_words([["tiny", 19, 4]]) == " (the trainer's step on tiny@19)"


@pytest.mark.parametrize("data_parallel", [True, False])
def test_the_data_parallel_check_can_be_left_out(tmp_path, with_broken_backend, monkeypatch, data_parallel):
    """On a machine with one GPU (--no-data-parallel) the 2-device check is not started."""
    started = []
    monkeypatch.setenv(backends.EXTRA_BACKENDS_ENV, "ghost=ghost_backend")
    monkeypatch.setattr(runner.parallel, "conformance_phase", lambda name, *args: started.append(name))
    floor = {"relative_input_change": 1e-6, "gradient_change": 1e-3, "worst_key": "classifier.weight"}
    monkeypatch.setattr(runner.checks, "gradient_sensitivity", lambda *args, **kwargs: floor)  # not measured here
    runner.run(tmp_path, backends=["ghost"], matrix="default", recipe="", data_parallel=data_parallel)
    assert started == (["ghost"] if data_parallel else [])
