"""`densenet-xf bench` end to end on a tiny net, and the d2l anchors against the spec.

No test here asserts a speed: a loaded machine would make it flaky. They assert that the
pipeline runs and writes well-formed results, so that it cannot rot.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conformance import backends, data, files, specs
from conformance.backends import BACKENDS
from conformance.bench import harness, memory_report, report, worker
from conformance.cli import main
from conformance.interface import PRECISIONS
from conformance.training import fashion_mnist_spec

TINY = ["--arch", "tiny_d2l", "--size", "16", "--batch", "8", "--examples", "64", "--warmup", "1", "--steps", "2"]
TINY += ["--repeats", "1"]


def check_outputs(out: Path, backends_run, device="cpu", repeats=1) -> dict:
    result = json.loads((out / "bench.json").read_text())
    assert result["device"] == device and result["frameworks"]["numpy"] and result["repeats"] == repeats
    assert [s["name"] for s in result["shapes"]] == ["tiny_d2l 16x16, batch 8"]
    first = [(r["backend"], r["run"], r["repeat"]) for r in result["rows"] if "rerun_of" not in r]
    assert first == [(b, run, k) for k in range(repeats) for b in backends_run for run in harness.RUNS]
    for row in result["rows"]:
        if row["status"] == "ok":
            assert row["examples"] == 2 * 8 and row["examples_per_s"] > 0 and row["peak_bytes"] > 0
            assert math.isfinite(row["loss"]) and row["first_step_s"] > 0 and row["arithmetic"]
            assert row["added_bytes"] >= 0 and 0 <= row["other_share"] and row["cpu_share"] > 0
            # CPU times tick at 100 Hz: only a window of a second or more gives a share to the percent
            assert row["seconds"] < 1 or row["cpu_share"] <= 1.05
            assert Path(row["compile_cache"]).name == "jax" and not Path(row["compile_cache"]).exists()
    for entry in result["summary"]:
        if entry["status"] == "ok" and entry["run"] != "anchor":
            speed = entry["examples_per_s"]
            assert speed["min"] <= speed["median"] <= speed["max"] and speed["n"] >= 1
            assert entry["vs_own_anchor"]["verdict"] in ("faster", "slower", "within noise")
    markdown = (out / "bench.md").read_text()
    assert "| backend | run | arithmetic | examples/s |" in markdown and result["device_words"] in markdown
    assert "flags:" in markdown  # the CPU features bf16 speed depends on
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return result


def test_bench_on_a_tiny_net_writes_json_markdown_and_png(tmp_path):
    pytest.importorskip("torch", reason="the bench test times the PyTorch backend")
    out, published = tmp_path / "bench", tmp_path / "docs"
    assert (
        main(
            [
                "bench",
                "--section",
                "speed",
                "--backends",
                "torch",
                *TINY,
                "--out",
                str(out),
                "--publish",
                str(published),
                "--quiet",
            ]
        )
        == 0
    )
    assert not (out / "memory_cpu.json").exists()  # the memory section did not run
    result = check_outputs(out, ["torch"])
    first = [r for r in result["rows"] if "rerun_of" not in r]
    assert [r["status"] for r in first] == ["ok", "skipped"] + ["ok"] * len(PRECISIONS)
    assert "already compiles its step" in first[1]["reason"]  # PyTorch's book loop has no second variant
    assert {r["run"]: r["arithmetic"].split()[0] for r in first if r["status"] == "ok"} == {
        "anchor": "fp32",
        "fp32": "fp32",
        "tf32": "fp32",
        "bf16": "bf16",
    }  # a CPU has no TF32
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (published / name).read_bytes() == (out / name).read_bytes()
    assert not (out / "data").exists()  # the shared .npy copy of the data set is removed


@pytest.mark.slow
def test_bench_every_backend_on_a_tiny_net(tmp_path):
    assert main(["bench", *TINY, "--out", str(tmp_path), "--quiet"]) == 0
    result = check_outputs(tmp_path, list(BACKENDS))
    assert all(r["status"] in ("ok", "skipped") for r in result["rows"])


def test_a_missing_framework_is_reported_as_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv(backends.EXTRA_BACKENDS_ENV, "ghost=ghost_backend")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent) + ":" + str(Path(__file__).parents[1]))
    assert main(["bench", "--backends", "ghost", *TINY, "--out", str(tmp_path), "--quiet"]) == 0
    result = check_outputs(tmp_path, ["ghost"])
    assert [r["status"] for r in result["rows"]] == ["skipped"] * len(harness.RUNS)
    assert "no anchor for backend 'ghost'" in result["rows"][0]["reason"]
    assert all("no_such_framework_xyz" in r["reason"] for r in result["rows"][2:])
    assert (
        "| ghost | trainer fp32 (exact) | skipped: backend 'ghost' is not available"
        in (tmp_path / "bench.md").read_text()
    )
    memory = json.loads((tmp_path / "memory_cpu.json").read_text())  # every section ran
    assert [r["status"] for r in memory["rows"]] == ["skipped"] * len(harness.MEMORY_MODES)
    assert memory["summary"][0]["status"] == "skipped" and "no_such_framework_xyz" in memory["summary"][0]["reason"]
    scaling = json.loads((tmp_path / "scaling_cpu.json").read_text())  # and the third
    assert [r["status"] for r in scaling["rows"]] == ["skipped"] * len(harness.SCALING_DEVICES)


def test_bench_rejects_bad_options_clearly(capsys):
    assert main(["bench", "--arch", "d2l", "--size", "16"]) == 2
    assert "too small for d2l" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--steps", "0"])
    assert "0 is not a positive integer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 1"):
        harness.run(device="cpu", warmup=0)
    with pytest.raises(ValueError, match="sections must be among speed, memory, scaling; got speeed"):
        harness.run(device="cpu", sections=("speeed",))
    with pytest.raises(SystemExit):
        main(["bench", "--section", "speeed"])
    assert "invalid choice: 'speeed'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "--backends", "torch,nope"])
    assert stopped.value.code == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err


def test_memory_section_measures_each_mode_in_its_own_process(tmp_path, monkeypatch):
    pytest.importorskip("torch", reason="the memory section test times the PyTorch backend")
    monkeypatch.setenv(backends.EXTRA_BACKENDS_ENV, "nomechanism=nomechanism_backend")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent) + ":" + str(Path(__file__).parents[1]))
    out, published = tmp_path / "bench", tmp_path / "docs"
    assert (
        main(
            [
                "bench",
                "--section",
                "memory",
                "--backends",
                "torch,nomechanism",
                *TINY,
                "--out",
                str(out),
                "--publish",
                str(published),
                "--quiet",
            ]
        )
        == 0
    )
    assert not (out / "bench.json").exists()  # the speed section did not run
    result = json.loads((out / "memory_cpu.json").read_text())
    first = [r for r in result["rows"] if "rerun_of" not in r]  # a busy machine reruns what it disturbed
    assert [(r["backend"], r["mode"]) for r in first] == [
        (b, mode) for b in ("torch", "nomechanism") for mode in harness.MEMORY_MODES
    ]
    assert {r["run"] for r in result["rows"]} == {harness.MEMORY_PRECISION}
    logs = {path.name for path in (out / "logs").iterdir()}  # one worker process per mode
    assert logs >= {
        f"tiny_d2l-16-{b}-{harness.MEMORY_PRECISION}{suffix}.log"
        for b in ("torch", "nomechanism")
        for suffix in ("", "-memory_efficient")
    }
    torch_entry, unsupported = result["summary"]
    # a tiny net's activations may fit in pages the warm-up left resident: at least nothing negative
    assert torch_entry["status"] == "ok" and torch_entry["peak_plain"] > torch_entry["added_plain"] >= 0
    assert torch_entry["time_ratio"] == torch_entry["step_s_efficient"] / torch_entry["step_s_plain"] > 0
    ratio = torch_entry["memory_ratio"]
    assert bool(torch_entry["target_met"]) == (ratio is not None and ratio <= 0.5 and torch_entry["time_ratio"] <= 1.2)
    assert unsupported["status"] == "unsupported" and "cannot recompute" in unsupported["reason"]
    # PyTorch's own measure (saved_tensors_hooks): recomputation keeps less for the backward pass
    assert 0 < torch_entry["activations_efficient"] < torch_entry["activations_plain"]
    assert "saved_tensors_hooks" in torch_entry["activation_kind"]
    markdown = (out / "memory_cpu.md").read_text()
    assert "| torch | " in markdown and "| nomechanism | no mechanism in this framework: this framework" in markdown
    for name in memory_report.files("cpu"):
        assert (published / name).read_bytes() == (out / name).read_bytes()
    assert (out / "memory_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scaling_section_runs_one_and_two_devices_on_each_engine(tmp_path):
    """PyTorch's 2-device run goes through torchrun (two processes, rank 0 writes), MXNet's
    through two contexts of one process; each device count in a process of its own."""
    pytest.importorskip("torch", reason="the scaling test launches PyTorch's DDP")
    pytest.importorskip("densenet_mxnet.compat", reason="the scaling test runs MXNet's contexts")
    out = tmp_path / "bench"
    assert (
        main(["bench", "--section", "scaling", "--backends", "torch,mxnet", *TINY, "--out", str(out), "--quiet"]) == 0
    )
    result = json.loads((out / "scaling_cpu.json").read_text())
    first = [r for r in result["rows"] if "rerun_of" not in r]  # a busy machine reruns what it disturbed
    assert [(r["backend"], r["mode"], r["devices"]) for r in first] == [
        (b, n, n) for b in ("torch", "mxnet") for n in harness.SCALING_DEVICES
    ]
    for entry in result["summary"]:
        assert entry["status"] == "ok" and entry["bn_semantics"] == "per_shard"
        assert entry["ratio"] == entry["two"] / entry["one"] > 0
    markdown = (out / "scaling_cpu.md").read_text()
    assert "| torch | " in markdown and "engine's overhead, not a speed-up" in markdown
    assert (out / "scaling_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_target_needs_half_the_memory_for_at_most_a_fifth_more_time():
    def run(peak, step_s):
        return {
            "status": "ok",
            "peak_bytes": peak,
            "added_bytes": peak - 100,
            "seconds": 3 * step_s,
            "steps": 3,
            "peak_kind": "process peak RSS",
            "device": "cpu",
            "arithmetic": "fp32",
        }

    plain = run(1100, 1.0)
    assert memory_report.compare(plain, run(600, 1.15))["target_met"]
    assert not memory_report.compare(plain, run(601, 1.0))["target_met"]  # training adds 501 of 1000
    assert not memory_report.compare(plain, run(300, 1.25))["target_met"]
    assert memory_report.compare(run(100, 1.0), run(100, 1.0))["memory_ratio"] is None  # nothing to compare
    own = {"activation_bytes": 1000, "activation_kind": "saved"}
    judged = memory_report.compare({**plain, **own}, {**run(1100, 1.1), "activation_bytes": 480})
    assert not judged["target_met"] and judged["target_met_own"] and judged["activations_ratio"] == 0.48
    assert memory_report.compare(plain, run(600, 1.15))["target_met_own"] is None  # no own measure


def test_index_batches_follow_the_shared_order_in_full_batches():
    batches = worker.index_batches(10, 4, 5, seed=3)
    first, second = data.epoch_order(10, 3, 1), data.epoch_order(10, 3, 2)
    expected = [first[0:4], first[4:8], second[0:4], second[4:8], data.epoch_order(10, 3, 3)[0:4]]
    assert all(np.array_equal(a, b) for a, b in zip(batches, expected, strict=True))


@pytest.fixture(scope="module", params=list(BACKENDS))
def anchor(request):
    try:
        module = worker.load_anchor(request.param)
    except worker.NoAnchor as error:
        pytest.skip(str(error))
    if (
        request.param == "jax"
    ):  # Flax's jitted init takes many seconds to compile on a CPU: cache it, as the backend does
        import jax

        if not jax.config.jax_compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", str(files.cache_dir() / "jax"))
    return module


@pytest.mark.parametrize("arch", ["tiny", "tiny_d2l"])
def test_anchor_builds_the_spec(anchor, arch):
    """The book's code, with the spec's widths, has the spec's parameters and output shape."""
    spec = fashion_mnist_spec(arch)
    net = anchor.Anchor(worker.anchor_arch(spec), 0.1, "cpu")
    assert net.num_params() == specs.count_params(spec)[0]
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    logits = net.logits(images)
    assert logits.shape == (3, spec.num_classes) and np.isfinite(logits).all()


def test_anchors_refuse_what_the_book_cannot_build():
    with pytest.raises(ValueError, match="halving transitions"):
        worker.anchor_arch(specs.get_spec("densenet40_k12"))


def test_a_ratio_whose_range_includes_one_is_within_noise():
    anchor = report.spread([100.0, 110.0, 120.0])
    assert report.ratio(report.spread([130.0, 140.0, 150.0]), anchor)["verdict"] == "faster"
    assert report.ratio(report.spread([80.0, 85.0, 90.0]), anchor)["verdict"] == "slower"
    within = report.ratio(report.spread([95.0, 125.0, 140.0]), anchor)
    assert within["verdict"] == "within noise" and within["min"] < 1 < within["max"]
    assert within["median"] == 125.0 / 110.0


def test_repeats_run_round_robin_and_a_contended_measurement_runs_again(tmp_path, monkeypatch):
    calls = []

    def fake_worker(backend, run, shape, data_path, device, warmup, steps, compile, out_dir, mode=None, repeat=0):
        calls.append((backend, run, repeat))
        busy = 0.5 if (backend, run, repeat) == ("torch", "fp32", 1) else 0.0  # another job took half the machine
        speed = {"anchor": 100.0, "fp32": 150.0}.get(run, 120.0) + repeat
        return {
            "status": "ok",
            "examples_per_s": speed,
            "first_step_s": 1.0,
            "added_bytes": 10,
            "peak_bytes": 20,
            "peak_kind": "RSS",
            "data_bytes": 0,
            "arithmetic": "fp32",
            "device": "cpu",
            "other_share": busy,
        }

    monkeypatch.setattr(harness, "_worker", fake_worker)
    monkeypatch.setattr(harness, "write_data", lambda *args: None)
    shape = harness.Shape("tiny_d2l", 16, 8, 64)
    measurements = [("torch", run, None) for run in ("anchor", "fp32")]
    rows = harness._section(report, [shape], measurements, "cpu", (1, 2), False, tmp_path, None, False, None, 3)
    assert calls[:6] == [("torch", run, k) for k in range(3) for run in ("anchor", "fp32")]  # round-robin
    assert calls[6:] == [("torch", "fp32", 4)]  # the contended one, once more
    assert [r.get("contended", False) for r in rows[:6]] == [False, False, False, True, False, False]
    result = json.loads((tmp_path / "bench.json").read_text())
    fp32 = next(e for e in result["summary"] if e["run"] == "fp32")
    assert fp32["contended"] == 1 and fp32["examples_per_s"]["n"] == 3  # repeats 0, 2 and the rerun
    assert fp32["vs_own_anchor"]["verdict"] == "faster"
    assert "beats the book's loop" in (tmp_path / "bench.md").read_text()


def test_every_worker_gets_empty_compilation_caches(tmp_path):
    env = harness.fresh_caches(tmp_path / "c")
    assert set(env) >= {"JAX_COMPILATION_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"}
    (tmp_path / "c" / "jax").mkdir()
    (tmp_path / "c" / "jax" / "stale").write_text("x")
    harness.fresh_caches(tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []


def test_the_steps_memory_excludes_what_was_resident_before():
    memory = worker.CpuMemory()
    held = np.ones(64 * 2**20 // 8)  # resident before the reset: not added by the steps
    memory.reset()
    added = np.ones(32 * 2**20 // 8)  # touched after it: added
    result = memory.read()
    assert 24 * 2**20 < result["added_bytes"] < 56 * 2**20 and result["peak_bytes"] >= result["added_bytes"]
    del held, added


def test_the_window_sees_other_work_on_the_machine():
    with worker.Window() as quiet:
        sum(range(2_000_000))
    assert 0 < quiet.cpu_share <= 1.05 and quiet.other_share >= 0


def test_scaling_is_skipped_with_a_reason_on_one_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "gpu_count", lambda: 1)
    monkeypatch.setattr(harness, "_worker", lambda *args, **kwargs: pytest.fail("nothing runs"))
    assert harness.run(tmp_path, "gpu", ["torch"], sections=("scaling",), progress=False) == 0
    rows = json.loads((tmp_path / "scaling_gpu.json").read_text())["rows"]
    assert rows and all(r["status"] == "skipped" and "1 GPU(s) visible" in r["reason"] for r in rows)


def test_the_machine_record_names_the_cpu_flags_that_matter():
    from conformance import reporting

    machine = reporting.machine_info()
    assert set(machine["flags"]) <= set(reporting.CPU_FLAGS) and "family" in machine["family"]
    assert "flags:" in reporting.machine_line(machine)


def test_the_book_loop_and_its_compiled_variant_both_train(anchor):
    """Each anchor steps (the book's loop), and so does its compiled variant where it has one."""
    spec = fashion_mnist_spec("tiny_d2l")
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (4, 16, 16), dtype=np.uint8), rng.integers(0, 10, 4)
    for kind in ("Anchor", "CompiledAnchor"):
        if not hasattr(anchor, kind):
            continue
        net = getattr(anchor, kind)(worker.anchor_arch(spec), 0.1, "cpu")
        losses = [float(net.step(images, labels)) for _ in range(3)]
        assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0], kind


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_each_anchor_imports_in_a_fresh_process(backend):
    """As a bench worker loads it: nothing imported before it (MXNet needs its NumPy 2 shim first)."""
    import subprocess
    import sys

    code = (
        "from conformance.bench import worker\n"
        f"try:\n    worker.load_anchor({backend!r})\nexcept worker.NoAnchor:\n    pass\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
