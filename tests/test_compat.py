"""`make compat` (version sets in venvs of their own, the table in docs/compat.md) and
`conformance.environment` (what PYTHON_ENV=system checks first), without building a venv."""

import json
from pathlib import Path

import pytest

from conformance import environment
from conformance.compat import runner, table
from conformance.compat.sets import SETS, VersionSet

ROOT = Path(__file__).resolve().parents[1]


def test_junit_counts_split_by_backend(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        """<testsuites><testsuite>
        <testcase classname="tests.test_backends" name="test_a[torch-d2l]"/>
        <testcase classname="tests.test_backends" name="test_a[jax-d2l]"><failure message="x"/></testcase>
        <testcase classname="tests.test_backends" name="test_b[tf]"><skipped message="no tf"/></testcase>
        <testcase classname="tests.test_specs" name="test_c[d2l]"/>
        </testsuite></testsuites>"""
    )
    result = runner.junit_counts(xml)
    assert result["counts"]["all"] == {"passed": 2, "failed": 1, "skipped": 1}
    assert result["counts"]["jax"] == {"passed": 0, "failed": 1, "skipped": 0}
    assert result["counts"]["core"]["passed"] == 1 and result["counts"]["tf"]["skipped"] == 1
    assert result["failed"] == ["tests.test_backends::test_a[jax-d2l]"]


def test_build_lifts_the_cap_only_when_asked_installs_no_deps_last_and_is_kept(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "CHECKOUT", tmp_path)
    monkeypatch.setattr(runner, "find_python", lambda version: f"/usr/bin/python{version}")

    def fake_run(argv, log, timeout, env=None):
        calls.append(([str(a) for a in argv], (env or {}).get("PIP_CONFIG_FILE")))
        if argv[1:3] == ["-m", "venv"]:
            (Path(argv[3]) / "bin").mkdir(parents=True)
            (Path(argv[3]) / "bin" / "python").write_text("")
        return 0

    monkeypatch.setattr(runner, "_run", fake_run)
    capped = VersionSet("x", "a test", "3.12", packages=("torch", "jax"), no_deps=("mxnet==1.9.1",), lift_cap=True)
    python = runner.build(capped, tmp_path / "build.log")
    assert python == tmp_path / ".compat" / "x" / "bin" / "python"
    assert calls[0][0][:3] == ["/usr/bin/python3.12", "-m", "venv"]
    assert calls[2][0][-2:] == ["torch", "jax"] and calls[3][0][-2:] == ["--no-deps", "mxnet==1.9.1"]
    assert {config for _, config in calls} == {runner.os.devnull}
    calls.clear()
    assert runner.build(capped, tmp_path / "build.log") == python and calls == []  # same definition: kept
    plain = VersionSet("x", "a test", "3.12", packages=("torch",))
    runner.build(plain, tmp_path / "build.log")  # another definition: built again, under the cap
    assert calls and {config for _, config in calls} == {None}


def test_a_set_that_reuses_a_venv_needs_it_built(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "CHECKOUT", tmp_path)
    with pytest.raises(runner.CompatError, match="make setup"):
        runner.build(SETS["pins"], tmp_path / "log")


def test_unknown_set_is_a_clear_error(capsys):
    assert runner.main(["run", "nightly"]) == 2
    assert "unknown version set 'nightly'; valid: pins, gpu, newest" in capsys.readouterr().err


def test_the_sets_hold_the_gpu_machines_versions_and_the_pins_venv():
    gpu = dict(p.split("==") for p in SETS["gpu"].packages if "==" in p)
    assert gpu["torch"] == "2.11.0" and gpu["jax"] == gpu["jaxlib"] == "0.11.2" and gpu["numpy"].startswith("2.5")
    assert SETS["gpu"].python == SETS["newest"].python == "3.12"  # jax 0.11 and newer need it
    assert SETS["pins"].venv == ".venv" and SETS["newest"].lift_cap and not SETS["gpu"].lift_cap


def result(name, passed=True, tf=False):
    checks = {"torch": {"tiny@19": "passed" if passed else "failed (exit code 1)"}}
    if tf:
        checks["tf"] = {"tiny@19": "passed"}
    return {
        "set": name,
        "about": f"the {name} set",
        "python": "3.12.1",
        "versions": {"torch": "2.11.0", "numpy": "2.5.2"},
        "tests": {
            "returncode": 0 if passed else 1,
            "counts": {
                "all": {"passed": 9, "failed": 0 if passed else 1, "skipped": 2},
                "torch": {"passed": 5, "failed": 0, "skipped": 0},
            },
            "failed": [] if passed else ["tests.test_backends::test_a[torch]"],
        },
        "checks": checks,
        "passed": passed,
        "date": "2026-12-06",
        "machine": "x86_64, 2 CPUs, Linux",
    }


def test_table_is_rendered_from_the_results(tmp_path):
    for name, kwargs in (("gpu", {}), ("newest", {"passed": False, "tf": True})):
        (tmp_path / f"{name}.json").write_text(json.dumps(result(name, **kwargs)))
    table.write(tmp_path, tmp_path / "compat.md")
    text = (tmp_path / "compat.md").read_text()
    assert "| `gpu` | passed | 3.12.1 | 2.11.0 | - |" in text
    assert "| `newest` | **failed** |" in text and "`tests.test_backends::test_a[torch]`" in text
    assert "9 passed, 0 failed, 2 skipped" in text and "not installed" in text
    assert "check 0/1 passed (failed: tiny@19)" in text


def test_the_committed_table_is_current():
    committed = ROOT / "docs" / "compat.md"
    assert committed.read_text() == table.markdown(table.load(ROOT / "docs" / "results" / "compat"))


def test_environment_lists_a_missing_core_package_and_exits_2(monkeypatch, capsys):
    missing = environment.Requirement("no_such_module_xf", "no-such-dist-xf", "a test")
    monkeypatch.setattr(environment, "CORE", (*environment.CORE, missing))
    assert environment.main(["--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no_such_module_xf (no-such-dist-xf, for a test): not installed" in err


def test_environment_reports_versions_without_importing_frameworks(capsys):
    import sys

    before = set(sys.modules)
    assert environment.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {r["module"] for r in report["core"]} == {"numpy", "safetensors", "matplotlib", "tqdm", "PIL"}
    assert set(report["frameworks"]) == {"torch", "mxnet", "tf", "jax"}
    frameworks = {"torch", "mxnet", "tensorflow", "jax", "flax"}
    assert not {name.split(".")[0] for name in set(sys.modules) - before} & frameworks
