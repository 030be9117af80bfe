import json

import pytest

from conformance import specs
from conformance.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_params_prints_the_count_last(capsys, backend):
    if backend == "torch":
        pytest.importorskip("torch")
    code, out, _ = run(capsys, "params", "--backend", backend, "--arch", "d2l")
    assert code == 0
    assert out.strip().splitlines()[-1] == "758226"


def test_shapes_prints_json_in_native_layout(capsys):
    code, out, _ = run(
        capsys, "shapes", "--backend", "reference", "--arch", "densenet121", "--size", "64", "--batch", "3"
    )
    payload = json.loads(out)
    assert code == 0 and payload["matches_spec"] and payload["layout"] == "NCHW"
    assert payload["stages"] == {k: list(v) for k, v in specs.stage_shapes(specs.ARCHS["densenet121"], 64, 3).items()}


def test_shapes_too_small_is_a_clear_error(capsys):
    code, _, err = run(capsys, "shapes", "--backend", "reference", "--arch", "d2l", "--size", "28")
    assert code == 2 and "smallest input that works is 29x29" in err


def test_check_reports_errors_as_json(capsys):
    pytest.importorskip("torch")
    code, out, _ = run(capsys, "check", "--backend", "torch", "--arch", "tiny", "--size", "19")
    payload = json.loads(out)
    assert code == 0 and payload["passed"]
    assert payload["results"]["float32"]["forward_eval"]["error"] < 1e-5
    assert set(payload["results"]) == {"float32", "float64"}


def test_check_reference_runs_finite_differences(capsys):
    code, out, _ = run(capsys, "check", "--backend", "reference", "--arch", "tiny_d2l", "--size", "13")
    assert code == 0 and json.loads(out)["finite_differences"]["passed"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["params", "--backend", "caffe", "--arch", "d2l"],
            "unknown backend 'caffe'; valid names: reference, torch, mxnet, tf, jax",
        ),
        (["params", "--backend", "torch", "--arch", "resnet50"], "unknown architecture 'resnet50'; valid names: d2l"),
    ],
)
def test_unknown_names_list_the_valid_ones(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_conformance_checks_its_inputs_before_any_worker(capsys, tmp_path, monkeypatch):
    from conformance.suite import runner

    monkeypatch.setattr(runner, "_worker", lambda *a: pytest.fail("a worker was started"))
    out = tmp_path / "out"
    code, _, err = run(capsys, "conformance", "--data-dir", str(tmp_path / "no-data"), "--out", str(out))
    assert code == 2 and "Fashion-MNIST not found (looked in --data-dir" in err and not out.exists()

    (tmp_path / "a-file").write_text("")
    code, _, err = run(capsys, "conformance", "--recipe", "none", "--out", str(tmp_path / "a-file" / "out"))
    assert code == 2 and "cannot be written" in err
    code, _, err = run(capsys, "conformance", "--recipe", "none", "--out", str(tmp_path / "a-file"))
    assert code == 2 and "exists and is not a directory" in err


def test_conformance_rejects_zero_jobs(capsys):
    with pytest.raises(SystemExit):
        main(["conformance", "--jobs", "0"])
    assert "argument --jobs: 0 is not a positive integer" in capsys.readouterr().err
