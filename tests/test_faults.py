"""Fault injection: each test breaks something on purpose and checks the program says so
clearly, keeps what it already wrote intact, and can go on."""

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_data import fake_files, write_files  # noqa: F401  (fake_files is a fixture)

from conformance import cli, data, files, training, weights
from conformance.backends import load_backend
from conformance.training import Recipe, TrainingError

ARCH = "tiny_d2l"
RECIPE = Recipe("faults", size=13, batch_size=8, lr=0.1, momentum=0.9, epochs=3, train_examples=16, test_examples=8)


@pytest.fixture
def fake_data(tmp_path, monkeypatch, fake_files):  # noqa: F811
    """Small stand-in Fashion-MNIST (labels 0-9) in tmp_path/data and a private resize cache."""
    table = dict(data.FILES)
    for name, (file, _, shape) in data.FILES.items():
        if name.endswith("labels"):
            payload = bytearray(fake_files[file])
            payload[8:] = bytes(b % 10 for b in payload[8:])
            fake_files[file] = bytes(payload)
            table[name] = (file, hashlib.sha256(payload).hexdigest(), shape)
    monkeypatch.setattr(data, "FILES", table)
    write_files(tmp_path / "data", fake_files)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "data"


def train(out, fake_data, **kwargs):
    """The NumPy reference backend: deterministic, and needs no framework."""
    return training.train(
        load_backend("reference"), ARCH, kwargs.pop("recipe", RECIPE), out, fake_data, progress=False, **kwargs
    )


def state_of(path):
    return weights.load_state(path)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# -- the resized-data cache -------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_resize_cache_is_rebuilt_with_a_notice(fake_data, tmp_path, capsys, damage):
    first = data.load_resized(13, fake_data)
    (cached,) = (tmp_path / "cache" / "densenet-xf").glob("fashion-mnist-13-*.npz")
    raw = cached.read_bytes()
    cached.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"PK\x03\x04" + bytes(100))
    capsys.readouterr()
    again = data.load_resized(13, fake_data)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "damaged" in err and str(cached) in err
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert cached.read_bytes() == raw  # rebuilt in place
    data.load_resized(13, fake_data)
    assert capsys.readouterr().err == ""


# -- damaged checkpoints, then --resume -------------------------------------------------


def resumed_run(out, fake_data, after_epoch):
    """A run stopped after `after_epoch` and resumed to the end, and its final weights. (The
    reference backend keeps float64 weights in memory and float32 on disk, so a resumed run
    is bit-identical only to one resumed at the same epoch.)"""
    train(out, fake_data, recipe=RECIPE.replace(epochs=after_epoch))
    train(out, fake_data, resume=True)
    return out, state_of(out / "model.safetensors")


@pytest.fixture
def finished_run(tmp_path, fake_data):
    return resumed_run(tmp_path / "run", fake_data, after_epoch=2)


@pytest.mark.parametrize(
    "victim, damage",
    [
        ("epoch-003.safetensors", "truncate"),
        ("epoch-003.optimizer.safetensors", "truncate"),
        ("epoch-003.optimizer.safetensors", "flip a byte"),  # same size: only the recorded SHA-256 sees it
        ("epoch-003.safetensors", "delete"),
    ],
)
def test_resume_after_a_damaged_checkpoint_restarts_from_the_last_intact_epoch(
    finished_run, fake_data, capsys, victim, damage
):
    out, final = finished_run
    path = out / "checkpoints" / victim
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 3])
    elif damage == "delete":
        path.unlink()
    else:
        raw[-1] ^= 0xFF
        path.write_bytes(raw)
    capsys.readouterr()
    record = train(out, fake_data, resume=True)
    err = capsys.readouterr().err
    assert str(path) in err and "resuming from epoch 2" in err
    assert [e["epoch"] for e in record["epochs"]] == [1, 2, 3]
    assert_same_state(state_of(out / "model.safetensors"), final)  # epoch 3 redone, bit for bit


def test_resume_with_no_intact_epoch_is_a_clear_error(finished_run, fake_data):
    out, _ = finished_run
    for epoch in (1, 2, 3):
        path = out / "checkpoints" / f"epoch-{epoch:03d}.safetensors"
        path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(TrainingError, match=r"no completed epoch has intact files.*epoch-001.safetensors"):
        train(out, fake_data, resume=True)


# -- unwritable output, full disk ------------------------------------------------------


def test_unwritable_output_directory_is_a_clear_error_before_training(tmp_path, fake_data, capsys):
    (tmp_path / "a-file").write_text("")
    code = cli.main(
        [
            "train",
            "--backend",
            "reference",
            "--arch",
            ARCH,
            "--size",
            "13",
            "--train-examples",
            "16",
            "--data-dir",
            str(fake_data),
            "--out",
            str(tmp_path / "a-file" / "run"),
            "--quiet",
        ]
    )
    assert code == 2
    assert "cannot write to the run directory" in capsys.readouterr().err


def failing_after(calls, error_number=errno.ENOSPC):
    """A stand-in for os.fsync that works `calls` times, then fails as a full disk does."""
    real, count = os.fsync, [0]

    def fsync(fd):
        count[0] += 1
        if count[0] > calls:
            raise OSError(error_number, os.strerror(error_number))
        return real(fd)

    return fsync


def test_full_disk_mid_write_keeps_the_old_file_and_says_which(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    files.atomic_write_text(path, "old")
    monkeypatch.setattr(weights.os, "fsync", failing_after(0))
    with pytest.raises(OSError, match=f"could not write {path} .No space left on device.*unchanged"):
        files.atomic_write_text(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]


def test_full_disk_during_training_leaves_a_resumable_run(tmp_path, fake_data, monkeypatch):
    _, expected = resumed_run(tmp_path / "expected", fake_data, after_epoch=1)
    out = tmp_path / "partial"
    with monkeypatch.context() as patch, pytest.raises(OSError, match="No space left on device"):
        patch.setattr(weights.os, "fsync", failing_after(4))  # epoch 1 commits (4 files), epoch 2 fails
        train(out, fake_data)
    assert [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]] == [1]
    assert not list(out.rglob("*.tmp"))
    train(out, fake_data, resume=True)
    assert_same_state(state_of(out / "model.safetensors"), expected)


# -- two runs into one directory -------------------------------------------------------

HOLD_LOCK = """
import sys, time
from conformance import training
run = training.Run(sys.argv[1])
run.lock()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_into_the_same_directory_is_refused_until_the_first_is_gone(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingError, match=f"in use by another run .pid {holder.pid} holds"):
            training.Run(tmp_path).lock()
    finally:
        holder.kill()  # a dead process's lock is stale: it must not block
        holder.wait()
    run = training.Run(tmp_path)
    run.lock()
    again = training.Run(tmp_path)
    again.lock()  # the same process may open the same run twice (resume after an error)
    del run, again
    check = subprocess.run(
        [sys.executable, "-c", HOLD_LOCK.replace("time.sleep(60)", ""), str(tmp_path)], capture_output=True, text=True
    )
    assert check.stdout.strip() == "locked", check.stderr  # released when the last Run was freed


# -- SIGINT / SIGTERM mid-epoch ------------------------------------------------------

needs_fashion_mnist = pytest.mark.skipif(
    not data._has_all(data.SYSTEM_DIR), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def start_training(out, cache, examples, *extra):
    pytest.importorskip("torch")
    command = [
        sys.executable,
        "-m",
        "conformance.cli",
        "train",
        "--backend",
        "torch",
        "--arch",
        ARCH,
        "--size",
        "28",
        "--batch-size",
        "32",
        "--train-examples",
        str(examples),
        "--test-examples",
        "64",
        "--epochs",
        "2",
        "--out",
        str(out),
        *extra,
    ]
    # A shell without job control starts background jobs with SIGINT ignored, and Python keeps an
    # inherited SIG_IGN: the child gets SIGINT's default back, as a program run at a terminal has.
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(process, pattern, timeout=300) -> str:
    """The process's output up to the first match of `pattern` (progress bars included)."""
    output, deadline = b"", time.monotonic() + timeout
    while not re.search(pattern, output.decode(errors="replace")):
        chunk = os.read(process.stdout.fileno(), 4096)
        assert chunk and time.monotonic() < deadline, output.decode(errors="replace")[-2000:]
        output += chunk
    return output.decode(errors="replace")


def stop(process, signum) -> str:
    process.send_signal(signum)
    try:
        return process.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        process.kill()


def assert_stopped_cleanly(process, output, signum, out):
    assert process.returncode == 128 + signum, output[-2000:]
    assert f"stopped by {signal.Signals(signum).name}" in output and f"saved in {out}" in output
    assert "--resume" in output and "Traceback" not in output


@needs_fashion_mnist
def test_sigterm_mid_epoch_stops_cleanly_and_the_run_resumes(tmp_path, shared_cache):
    out = tmp_path / "run"
    process = start_training(out, shared_cache, 480)
    wait_for(process, r"torch epoch 1: loss")  # epoch 1 is committed; epoch 2 starts at once
    assert_stopped_cleanly(process, stop(process, signal.SIGTERM), signal.SIGTERM, out)
    assert [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]] == [1]
    resumed = start_training(out, shared_cache, 480, "--resume", "--quiet")
    output = resumed.communicate(timeout=300)[0].decode(errors="replace")
    assert resumed.returncode == 0, output[-2000:]
    assert [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]] == [1, 2]


@needs_fashion_mnist
def test_sigint_after_the_first_batches_stops_cleanly(tmp_path, shared_cache):
    out = tmp_path / "run"
    # The whole training set: two epochs last far longer than reading the output takes, even
    # when a fast machine steps through a few hundred batches before the test reads a line.
    process = start_training(out, shared_cache, 60000)
    wait_for(process, r"epoch 1/2:.*\| *[1-9]\d*/1875")  # a batch has run, the epoch has not ended
    assert_stopped_cleanly(process, stop(process, signal.SIGINT), signal.SIGINT, out)
    assert not (out / "metrics.json").exists() or json.loads((out / "metrics.json").read_text())["epochs"]
    assert not list(out.rglob("*.tmp"))


# -- permissions ---------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_files_honour_the_umask(tmp_path, fake_data, umask):
    previous = os.umask(umask)
    try:
        train(tmp_path / "run", fake_data, recipe=RECIPE.replace(epochs=1))
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != training.Run.LOCK_NAME]
    assert len(files) == 4
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


# -- bad numbers on the command line ------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--backend", "torch", "--size", "-5"], "argument --size: -5 is not a positive integer"),
        (["train", "--backend", "torch", "--batch-size", "0"], "argument --batch-size: 0 is not a positive integer"),
        (["train", "--backend", "torch", "--epochs", "0"], "argument --epochs: 0 is not a positive integer"),
        (["train", "--backend", "torch", "--train-examples", "-1"], "argument --train-examples: -1 is not a positive"),
        (["train", "--backend", "torch", "--lr", "-0.1"], "argument --lr: -0.1 is not a positive number"),
        (["train", "--backend", "torch", "--seed", "-3"], "argument --seed: -3 is not a non-negative integer"),
        (["train", "--backend", "torch", "--epochs", "two"], "argument --epochs: 'two' is not a positive integer"),
        (["shapes", "--backend", "reference", "--arch", "d2l", "--size", "0"], "argument --size: 0 is not a positive"),
        (["check", "--backend", "reference", "--arch", "d2l", "--size", "32", "--batch", "-2"], "argument --batch: -2"),
        (
            ["evaluate", "--backend", "torch", "--checkpoint", "x", "--batch-size", "0"],
            "argument --batch-size: 0 is not",
        ),
        (["seed-spread", "--backend", "torch", "--seeds", "0"], "argument --seeds: 0 is not a positive integer"),
    ],
)
def test_non_positive_numbers_are_argparse_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
