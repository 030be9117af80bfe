"""The GPU check's orchestration with fake phases (time boxes, partial results, the record,
publishing), and its rehearsal on the CPU (slow)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conformance.gpucheck import plan, publish, summary
from conformance.gpucheck.timebox import RECORD, Phase, allowance, run_phases

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def sleeper(seconds: float, marker: str | None = None) -> list[str]:
    """A process that writes `marker` (a partial result), starts a child that sleeps, and sleeps."""
    code = (
        "import subprocess, sys, time, pathlib\n"
        f"marker = {marker!r}\n"
        "if marker: pathlib.Path(marker).write_text('done so far')\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep({seconds})'])\n"
        "if marker: pathlib.Path(marker + '.child').write_text(str(child.pid))\n"
        f"time.sleep({seconds})\n"
    )
    return [PY, "-c", code]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    status = Path(f"/proc/{pid}/stat")
    return not (status.is_file() and status.read_text().split(") ")[1].startswith("Z"))


def test_a_phase_past_its_box_is_stopped_with_its_children_and_keeps_what_it_wrote(tmp_path):
    marker = tmp_path / "partial.txt"
    seen = {}

    def quick(context):
        context.command([PY, "-c", "print('hello')"], "quick")
        return {"files": ["x"]}

    def slow(context):
        context.command(sleeper(60, str(marker)), "slow")

    def reads_the_record(context):
        seen.update(json.loads((context.out_dir / RECORD).read_text())["phases"])

    phases = [Phase("quick", quick, 30), Phase("slow", slow, 2), Phase("after", reads_the_record, 30)]
    start = time.monotonic()
    record = run_phases(phases, tmp_path / "out", budget_s=60)
    assert time.monotonic() - start < 20
    assert record["phases"]["quick"]["status"] == "ok" and record["phases"]["quick"]["files"] == ["x"]
    slow_entry = record["phases"]["slow"]
    assert slow_entry["status"] == "timed out" and slow_entry["commands"][0]["timed_out"]
    assert marker.read_text() == "done so far"  # what the stopped phase had written stays
    child = int(Path(str(marker) + ".child").read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child), "the stopped phase's child process was left running"
    assert "time box" in (tmp_path / "out" / "logs" / "slow.log").read_text()
    # while a later phase ran, the record on disk already held the earlier ones
    assert seen["quick"]["status"] == "ok" and seen["slow"]["status"] == "timed out"
    assert seen["after"]["status"] == "running"
    on_disk = json.loads((tmp_path / "out" / RECORD).read_text())
    assert on_disk["phases"]["after"]["status"] == "ok" and "finished" in on_disk


def test_a_failing_or_broken_phase_is_recorded_and_the_next_ones_still_run(tmp_path):
    def fails(context):
        context.command([PY, "-c", "import sys; sys.exit(3)"], "fails")

    def breaks(context):
        raise RuntimeError("the phase itself broke")

    ran = []
    phases = [Phase("fails", fails, 30), Phase("breaks", breaks, 30), Phase("last", lambda c: ran.append(1), 30)]
    record = run_phases(phases, tmp_path, budget_s=60)
    assert record["phases"]["fails"]["status"] == "failed"
    assert record["phases"]["fails"]["commands"][0]["returncode"] == 3
    assert record["phases"]["breaks"]["status"] == "error" and "broke" in record["phases"]["breaks"]["reason"]
    assert record["phases"]["last"]["status"] == "ok" and ran == [1]


def test_later_phases_reserve_their_time_and_a_phase_without_enough_is_skipped(tmp_path):
    phases = [
        Phase("a", lambda c: None, 100, 0),
        Phase("b", lambda c: None, 100, 30),
        Phase("c", lambda c: None, 5, 50),
    ]
    assert allowance(phases, 0, 100) == 20  # 100 s left, 80 reserved by b and c
    assert allowance(phases, 1, 100) == 50
    assert allowance(phases, 2, 100) == 5
    record = run_phases(phases, tmp_path / "enough", budget_s=100)
    assert [phase["status"] for phase in record["phases"].values()] == ["ok"] * 3
    assert record["phases"]["a"]["allowed_s"] <= 20
    record = run_phases(phases, tmp_path / "short", budget_s=70)  # b would get 20 s, less than its 30
    assert record["phases"]["a"]["status"] == record["phases"]["b"]["status"] == "skipped"
    assert "not enough time" in record["phases"]["b"]["reason"]
    assert record["phases"]["c"]["status"] == "ok"


def test_a_command_started_after_the_deadline_does_not_run(tmp_path):
    commands = []

    def late(context):
        context.deadline = time.monotonic() - 1
        commands.append(context.command([PY, "-c", "open('ran', 'w')"], "late"))

    record = run_phases([Phase("late", late, 30)], tmp_path, budget_s=30)
    assert record["phases"]["late"]["status"] == "timed out" and commands[0].returncode is None
    assert not (ROOT / "ran").exists() and not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    "left, done, epoch_s, start_s, expected",
    [
        (400, 0, 20, 40, 10),  # all ten fit
        (100, 0, 20, 40, 3),  # as many as fit
        (30, 0, 20, 40, 1),  # none fits: one all the same, the time box stops it if need be
        (100, 4, 20, 10, 8),
        (5, 4, 20, 10, 4),  # none more fits
        (100, 0, None, 0, 1),  # no estimate yet: one epoch measures it
    ],
)
def test_epochs_estimate(left, done, epoch_s, start_s, expected):
    assert plan.estimate_epochs(left, 10, done, epoch_s, start_s) == expected


def test_epoch_seconds_prefers_measured_epochs_after_the_first():
    probe = {"step_time": {"step_s": 0.01}}
    assert plan.epoch_seconds([], probe, 235, margin=1.0) == pytest.approx(2.35)
    assert plan.epoch_seconds([], {}, 235) is None
    assert plan.epoch_seconds([{"seconds": 30.0}], probe, 235, margin=1.0) == 30.0  # includes compiling
    assert plan.epoch_seconds([{"seconds": 30.0}, {"seconds": 3.0}, {"seconds": 4.0}], probe, 235, 1.0) == 4.0


def test_publish_copies_reports_and_logs_not_weights(tmp_path):
    source = tmp_path / "run"
    files = {
        RECORD: "{}",
        "summary.md": "# s",
        "logs/conformance.log": "log",
        "train/torch/metrics.json": "{}",
        "train/torch/model.safetensors": "w",
        "train/torch/checkpoints/epoch-001.safetensors": "w",
        "conformance/onnx/torch.onnx": "g",
        "conformance/exports/torch.json": "{}",
        "bench/bench.png": "p",
    }
    for name, text in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    destination = tmp_path / "docs" / "gpu"
    (destination / "old").mkdir(parents=True)
    copied = publish.publish(source, destination)
    assert sorted(map(str, copied)) == sorted(
        [RECORD, "summary.md", "logs/conformance.log", "train/torch/metrics.json", "bench/bench.png"]
    )
    assert (destination / "summary.md").read_text() == "# s" and not (destination / "old").exists()
    assert publish.main([str(tmp_path / "nothing"), str(destination)]) == 2


def test_summary_of_a_run_stopped_early_says_so(tmp_path):
    record = {
        "budget_s": 480,
        "elapsed_s": 100,
        "backends": ["torch"],
        "phases": {
            "environment": {"status": "ok", "seconds": 10},
            "train-torch": {
                "status": "partial",
                "epochs_trained": 3,
                "epochs_planned": 10,
                "complete": False,
                "test_acc": 0.85,
                "recipe": "d2l",
            },
            "bench-speed": {"status": "running", "commands": [{"log": "logs/bench.log"}]},
        },
    }
    text = summary.markdown(tmp_path, record)
    assert "not finished" in text and "3 of 10 (as many as fit)" in text and "0.8500" in text
    assert "[logs/bench.log](logs/bench.log)" in text


def test_bad_arguments_get_a_clear_error(capsys):
    assert plan.main(["--backends", "torch,caffe", "--out", "/nonexistent/x"]) == 2
    assert "unknown backend 'caffe'" in capsys.readouterr().err
    assert plan.main(["--budget", "0"]) == 2


def _registry_unreachable_env(tmp_path) -> dict:
    """No package registry: pip may not look at an index, and every HTTP(S) request goes to a closed port."""
    blocked = "http://127.0.0.1:9"
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PIP_NO_INDEX": "1",
        "HTTP_PROXY": blocked,
        "HTTPS_PROXY": blocked,
        "http_proxy": blocked,
        "https_proxy": blocked,
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }


@pytest.mark.slow
def test_rehearsal_passes_offline_in_the_gpu_machines_versions(tmp_path):
    """`make gpu-check` rehearsed on the CPU with tiny sizes, in the `gpu` version set's venv
    (`make compat VERSIONS=gpu` builds it), with no registry reachable."""
    python = ROOT / ".compat" / "gpu" / "bin" / "python"
    if not python.is_file():
        pytest.skip("the gpu version set's venv is not built (make compat VERSIONS=gpu)")
    from conformance import data

    try:
        data.find_data_dir(download=False)
    except data.DataError as error:
        pytest.skip(str(error))
    out = tmp_path / "gpu-check"
    done = subprocess.run(
        [str(python), "-m", "conformance.gpucheck", "--rehearse", "--out", str(out), "--budget", "900"],
        env=_registry_unreachable_env(tmp_path),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    record = json.loads((out / RECORD).read_text())
    statuses = {name: phase["status"] for name, phase in record["phases"].items()}
    assert done.returncode == 0, (statuses, done.stderr[-3000:])
    assert statuses == dict.fromkeys(statuses, "ok")
    environment = json.loads((out / "environment.json").read_text())
    assert environment["torch"]["versions"]["torch"].startswith("2.11.0")
    assert environment["jax"]["versions"]["jax"] == "0.11.2"
    for name in ("torch", "jax"):
        phase = record["phases"][f"train-{name}"]
        assert phase["complete"] and phase["epochs_trained"] == plan.REHEARSAL.epochs
    assert record["phases"]["conformance"]["passed"]
    for report in ("summary.md", "conformance/report.md", "bench/bench.md", "bench-memory/memory_cpu.md"):
        assert (out / report).is_file(), report
    copied = publish.publish(out, tmp_path / "published")
    assert Path("summary.md") in copied and not any(p.suffix == ".safetensors" for p in copied)


def test_the_phases_fill_the_default_budget_and_scale_with_another():
    default = plan.phases(plan.GPU, ["torch", "jax"], "fp32")
    assert [p.name for p in default] == [
        "environment",
        "conformance",
        "train-torch",
        "train-jax",
        "bench-speed",
        "bench-memory",
    ]
    # the essential phases fit the default budget even when each takes its whole box
    essential = sum(p.box_s for p in default[:4])
    assert essential <= plan.DEFAULT_BUDGET_S
    doubled = plan.phases(plan.GPU, ["torch"], "fp32", 2 * plan.DEFAULT_BUDGET_S)
    assert doubled[1].box_s == 2 * default[1].box_s and doubled[1].reserve_s == 2 * default[1].reserve_s
