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
from conformance.bench import harness, memory_report, worker
from conformance.cli import main
from conformance.interface import PRECISIONS
from conformance.training import fashion_mnist_spec

TINY = ["--arch", "tiny_d2l", "--size", "16", "--batch", "8", "--examples", "64", "--warmup", "1", "--steps", "2"]


def check_outputs(out: Path, backends_run, device="cpu") -> dict:
    result = json.loads((out / "bench.json").read_text())
    assert result["device"] == device and result["frameworks"]["numpy"]
    assert [s["name"] for s in result["shapes"]] == ["tiny_d2l 16x16, batch 8"]
    assert [(r["backend"], r["run"]) for r in result["rows"]] == [
        (b, run) for b in backends_run for run in harness.RUNS
    ]
    for row in result["rows"]:
        if row["status"] == "ok":
            assert row["examples"] == 2 * 8 and row["examples_per_s"] > 0 and row["peak_bytes"] > 0
            assert math.isfinite(row["loss"]) and row["first_step_s"] > 0 and row["arithmetic"]
            assert row["vs_own_anchor"] > 0 and row["vs_fastest_anchor"] > 0
    markdown = (out / "bench.md").read_text()
    assert "| backend | run | arithmetic | examples/s |" in markdown and result["device_words"] in markdown
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
    assert [r["status"] for r in result["rows"]] == ["ok"] * (1 + len(PRECISIONS))
    assert {r["run"]: r["arithmetic"].split()[0] for r in result["rows"]} == {
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
    assert all("no_such_framework_xyz" in r["reason"] for r in result["rows"][1:])
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
    assert [(r["backend"], r["mode"]) for r in result["rows"]] == [
        (b, mode) for b in ("torch", "nomechanism") for mode in harness.MEMORY_MODES
    ]
    assert {r["run"] for r in result["rows"]} == {harness.MEMORY_PRECISION}
    logs = sorted(path.name for path in (out / "logs").iterdir())  # one worker process per mode
    assert logs == sorted(
        f"tiny_d2l-16-{b}-{harness.MEMORY_PRECISION}{suffix}.log"
        for b in ("torch", "nomechanism")
        for suffix in ("", "-memory_efficient")
    )
    torch_entry, unsupported = result["summary"]
    assert torch_entry["status"] == "ok" and torch_entry["peak_plain"] > torch_entry["added_plain"] > 0
    assert torch_entry["time_ratio"] == torch_entry["step_s_efficient"] / torch_entry["step_s_plain"] > 0
    assert torch_entry["target_met"] == (torch_entry["memory_ratio"] <= 0.5 and torch_entry["time_ratio"] <= 1.2)
    assert unsupported["status"] == "unsupported" and "cannot recompute" in unsupported["reason"]
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
    assert [(r["backend"], r["mode"], r["devices"]) for r in result["rows"]] == [
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
            "before_steps_bytes": 100,
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
