import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from conformance import data
from conformance.data import DataError

needs_fashion_mnist = pytest.mark.skipif(
    not data._has_all(data.SYSTEM_DIR), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)


def fake_idx(shape, seed=0) -> bytes:
    header = bytes([0, 0, 0x08, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)
    return header + np.random.default_rng(seed).integers(0, 256, int(np.prod(shape)), dtype=np.uint8).tobytes()


@pytest.fixture
def fake_files(monkeypatch):
    """Small stand-in IDX files, with the digest table patched to match them."""
    payloads, table = {}, {}
    for name, (file, _, shape) in data.FILES.items():
        shape = (20, 28, 28) if len(shape) == 3 else (20,)
        payloads[file] = fake_idx(shape, seed=len(payloads))
        table[name] = (file, hashlib.sha256(payloads[file]).hexdigest(), shape)
    monkeypatch.setattr(data, "FILES", table)
    return payloads


def write_files(directory: Path, payloads):
    directory.mkdir(parents=True, exist_ok=True)
    for file, payload in payloads.items():
        (directory / file).write_bytes(gzip.compress(payload))


@needs_fashion_mnist
def test_real_files_load_with_checked_digests():
    d = data.load_fashion_mnist()
    assert d["train_images"].shape == (60000, 28, 28) and d["test_labels"].shape == (10000,)
    assert d["train_labels"][:3].tolist() == [9, 0, 0]
    assert np.bincount(d["test_labels"]).tolist() == [1000] * 10


def test_explicit_directory_wins_over_the_environment(tmp_path, monkeypatch, fake_files):
    write_files(tmp_path / "a", fake_files)
    write_files(tmp_path / "b", fake_files)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "b"))
    assert data.find_data_dir(tmp_path / "a") == tmp_path / "a"
    assert data.find_data_dir() == tmp_path / "b"


def test_missing_files_say_where_it_looked_and_how_to_fix(tmp_path):
    with pytest.raises(
        DataError, match=r"not found \(looked in --data-dir: .*empty\).*apt-get install dataset-fashion-mnist"
    ):
        data.find_data_dir(tmp_path / "empty")


def test_corrupt_file_is_caught_by_its_digest(tmp_path, fake_files):
    write_files(tmp_path, fake_files)
    file = data.FILES["train_labels"][0]
    damaged = bytearray(fake_files[file])
    damaged[-1] ^= 0xFF
    (tmp_path / file).write_bytes(gzip.compress(bytes(damaged)))
    with pytest.raises(DataError, match=f"{file} is corrupt: SHA-256"):
        data.load_fashion_mnist(tmp_path)


def test_truncated_gzip_is_a_clear_error(tmp_path, fake_files):
    write_files(tmp_path, fake_files)
    file = data.FILES["test_images"][0]
    (tmp_path / file).write_bytes((tmp_path / file).read_bytes()[:100])
    with pytest.raises(DataError, match="cannot be read as a gzip IDX file"):
        data.load_fashion_mnist(tmp_path)


def serve(directory: Path):
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(directory))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_download_checks_digests_and_writes_atomically(tmp_path, fake_files, monkeypatch):
    monkeypatch.setattr(http.server.SimpleHTTPRequestHandler, "log_message", lambda *a: None)
    write_files(tmp_path / "server", fake_files)
    server = serve(tmp_path / "server")
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        target = data.download_fashion_mnist(tmp_path / "cache", url)
        assert data.load_fashion_mnist(target)["train_labels"].shape == (20,)

        bad = data.FILES["test_labels"][0]
        (tmp_path / "server" / bad).write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(24)))
        with pytest.raises(DataError, match=f"{bad} is corrupt"):
            data.download_fashion_mnist(tmp_path / "cache2", url)
        assert not (tmp_path / "cache2" / bad).exists()
    finally:
        server.shutdown()


def test_unreachable_download_says_how_to_fix(tmp_path, fake_files):
    with pytest.raises(DataError, match="could not download .*dataset-fashion-mnist"):
        data.download_fashion_mnist(tmp_path, "http://127.0.0.1:9/")


def test_epoch_order_is_seeded_per_epoch():
    a, b = data.epoch_order(100, seed=0, epoch=1), data.epoch_order(100, seed=0, epoch=1)
    assert np.array_equal(a, b) and sorted(a) == list(range(100))
    assert not np.array_equal(a, data.epoch_order(100, seed=0, epoch=2))


def test_batches_are_float32_nchw_in_unit_range():
    images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4) * 3
    labels = np.arange(5)
    got = list(data.batches(images, labels, 2, order=np.array([4, 0, 1, 2, 3])))
    assert [x.shape for x, _ in got] == [(2, 1, 4, 4), (2, 1, 4, 4), (1, 1, 4, 4)]
    x, y = got[0]
    assert x.dtype == np.float32 and y.tolist() == [4, 0]
    np.testing.assert_allclose(x[0, 0], images[4] / 255.0)


@needs_fashion_mnist
def test_resize_is_cached_and_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = data.load_resized(30)
    assert first["train_images"].shape == (60000, 30, 30) and first["train_images"].dtype == np.uint8
    assert len(list((tmp_path / "densenet-xf").glob("fashion-mnist-30-*.npz"))) == 1
    second = data.load_resized(30)
    assert np.array_equal(first["test_images"], second["test_images"])


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No Fashion-MNIST anywhere: an empty system directory and cache, no environment variable."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(data, "CHECKOUT_DIR", tmp_path / "checkout" / ".device-data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_the_checkouts_device_data_is_found_without_flags(nowhere, fake_files, monkeypatch):
    write_files(data.CHECKOUT_DIR, fake_files)
    write_files(data.SYSTEM_DIR, fake_files)
    monkeypatch.setattr(data, "apt_install", lambda: pytest.fail("apt-get was called"))
    assert data.ensure_data() == data.find_data_dir() == data.CHECKOUT_DIR
    monkeypatch.setenv(data.ENV_VAR, str(data.SYSTEM_DIR))  # the variable still wins
    assert data.find_data_dir() == data.SYSTEM_DIR


def test_the_device_data_folder_is_the_checkouts_and_git_ignored():
    root = Path(data.__file__).resolve().parents[1]
    assert data.CHECKOUT_DIR == root / ".device-data"
    assert "/.device-data/" in (root / ".gitignore").read_text().splitlines()


def test_ensure_uses_files_already_present_and_installs_nothing(nowhere, fake_files, monkeypatch):
    write_files(data.SYSTEM_DIR, fake_files)
    monkeypatch.setattr(data, "apt_install", lambda: pytest.fail("apt-get was called"))
    monkeypatch.setattr(data, "download_fashion_mnist", lambda *a: pytest.fail("downloaded"))
    assert data.ensure_data() == data.SYSTEM_DIR


def test_ensure_installs_the_debian_package_first(nowhere, fake_files, monkeypatch):
    monkeypatch.setattr(data, "apt_install", lambda: write_files(data.SYSTEM_DIR, fake_files))
    monkeypatch.setattr(data, "download_fashion_mnist", lambda *a: pytest.fail("downloaded"))
    assert data.ensure_data() == data.SYSTEM_DIR


def test_ensure_downloads_when_apt_cannot(nowhere, monkeypatch):
    downloads = []
    monkeypatch.setattr(data, "apt_install", lambda: "not root and sudo needs a password")
    monkeypatch.setattr(data, "download_fashion_mnist", lambda target: downloads.append(target) or target)
    assert data.ensure_data() == nowhere / "cache" / "densenet-xf" / "fashion-mnist" == downloads[0]


def test_ensure_lists_every_place_and_the_fix_when_all_fail(nowhere, monkeypatch, capsys):
    def no_route(target):
        raise DataError("could not download http://example/x (no route to host)")

    monkeypatch.setattr(data, "apt_install", lambda: "apt-get not found (not Debian/Ubuntu)")
    monkeypatch.setattr(data, "download_fashion_mnist", no_route)
    assert data.main(["--ensure"]) == 1
    err = capsys.readouterr().err
    for place in (
        str(nowhere / "system"),
        str(nowhere / "cache"),
        "apt-get not found",
        "no route to host",
        "`sudo apt-get install -y dataset-fashion-mnist`",
        data.ENV_VAR,
    ):
        assert place in err, place


def test_ensure_with_a_chosen_directory_installs_nothing(nowhere, monkeypatch):
    monkeypatch.setattr(data, "apt_install", lambda: pytest.fail("apt-get was called"))
    with pytest.raises(DataError, match="looked in --data-dir"):
        data.ensure_data(nowhere / "mine")


@pytest.mark.parametrize(
    "uid, sudo_ok, expected",
    [
        (0, False, [["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"]]),
        (
            1000,
            True,
            [
                ["sudo", "-n", "true"],
                ["sudo", "-n", "apt-get", "update", "-q"],
                ["sudo", "-n", "apt-get", "install", "-y", "-q", "dataset-fashion-mnist"],
            ],
        ),
        (1000, False, [["sudo", "-n", "true"]]),
    ],
)
def test_apt_install_runs_as_root_or_through_non_interactive_sudo(monkeypatch, uid, sudo_ok, expected):
    import subprocess

    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0 if sudo_ok or command[0] != "sudo" else 1)

    monkeypatch.setattr(data.os, "geteuid", lambda: uid)
    monkeypatch.setattr(data.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(data.subprocess, "run", fake_run)
    why = data.apt_install()
    assert calls == expected
    assert (why is None) == (uid == 0 or sudo_ok)
    if why:
        assert "sudo needs a password" in why


def test_apt_install_reports_a_failing_command(monkeypatch):
    import subprocess

    monkeypatch.setattr(data.os, "geteuid", lambda: 0)
    monkeypatch.setattr(data.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(data.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(command, 100))
    assert data.apt_install() == "`apt-get update -q` exited with code 100"
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    assert "apt-get not found" in data.apt_install()
