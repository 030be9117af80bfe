"""Fashion-MNIST, read once by shared code, so every backend trains on identical batches.

Where the files come from, in order: an explicit directory (`--data-dir`), the environment
variable DENSENET_XF_DATA, the checkout's git-ignored `.device-data/` (the files carried to a
machine without network), the Debian package `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist), and a cache directory filled by a download from the
official source. Every file is checked against the SHA-256 of its decompressed IDX payload,
so re-compressed copies (Debian's) and the official archives both pass and a corrupt or
truncated file is caught. Resizing (96x96 for the d2l recipe) is done here, once, with
Pillow's bilinear filter as torchvision's Resize does for d2l, and cached; no framework's
own resize touches the inputs.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from .files import atomic_write_bytes, cache_dir

ENV_VAR = "DENSENET_XF_DATA"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
# The four files carried with a checkout to a machine without network (git-ignored).
CHECKOUT_DIR = Path(__file__).resolve().parents[1] / ".device-data"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {  # name: (file, SHA-256 of the decompressed content, IDX shape)
    "train_images": (
        "train-images-idx3-ubyte.gz",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        (60000, 28, 28),
    ),
    "train_labels": (
        "train-labels-idx1-ubyte.gz",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        (60000,),
    ),
    "test_images": (
        "t10k-images-idx3-ubyte.gz",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        (10000, 28, 28),
    ),
    "test_labels": (
        "t10k-labels-idx1-ubyte.gz",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        (10000,),
    ),
}


class DataError(RuntimeError):
    """Fashion-MNIST could not be found, downloaded or read."""


def _has_all(directory: Path) -> bool:
    return all((directory / file).is_file() for file, _, _ in FILES.values())


def candidate_dirs(data_dir=None) -> list[tuple[str, Path]]:
    """(where, directory) pairs looked in, in order."""
    if data_dir is not None:
        return [("--data-dir", Path(data_dir))]
    if os.environ.get(ENV_VAR):
        return [(ENV_VAR, Path(os.environ[ENV_VAR]))]
    return [
        ("the checkout's .device-data", CHECKOUT_DIR),
        ("Debian package dataset-fashion-mnist", SYSTEM_DIR),
        ("download cache", cache_dir() / "fashion-mnist"),
    ]


def find_data_dir(data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The first directory holding all four files; download into the cache if none does."""
    candidates = candidate_dirs(data_dir)
    for _, directory in candidates:
        if _has_all(directory):
            return directory
    if data_dir is None and not os.environ.get(ENV_VAR) and download:
        return download_fashion_mnist(cache_dir() / "fashion-mnist")
    looked = "; ".join(f"{where}: {directory}" for where, directory in candidates)
    raise DataError(
        f"Fashion-MNIST not found (looked in {looked}). Install it with "
        f"`sudo apt-get install dataset-fashion-mnist`, or pass --data-dir / set {ENV_VAR} "
        f"to a directory holding {', '.join(f for f, _, _ in FILES.values())}"
    )


def check_readable(data_dir=None) -> Path:
    """The data directory, after checking that each file opens and starts as a gzip or IDX
    file (the full SHA-256 check happens when the data is loaded)."""
    directory = find_data_dir(data_dir, download=False)
    for file, _, _ in FILES.values():
        try:
            with open(directory / file, "rb") as f:
                head = f.read(4)
        except OSError as error:
            raise DataError(f"{directory / file} cannot be read: {error.strerror or error}") from error
        if head[:2] != b"\x1f\x8b" and head[:3] != b"\x00\x00\x08":
            raise DataError(f"{directory / file} is neither gzip nor an IDX file; reinstall {DEBIAN_PACKAGE}")
    return directory


def apt_install(package: str = DEBIAN_PACKAGE) -> str | None:
    """Install a Debian package as root or through non-interactive sudo; None on success,
    else why it could not."""
    if shutil.which("apt-get") is None:
        return "apt-get not found (not Debian/Ubuntu)"
    if os.geteuid() == 0:
        prefix = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        prefix = ["sudo", "-n"]
    else:
        return "not root and sudo needs a password"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", package]):
        done = subprocess.run(prefix + command, env=env, stdout=sys.stderr, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            return f"`{' '.join(prefix + command)}` exited with code {done.returncode}"
    return None


def ensure_data(data_dir=None) -> Path:
    """Fashion-MNIST, obtained if missing: the files already present, else the Debian package
    (root or `sudo -n`), else the download with SHA-256 checks, else a DataError that lists
    every place looked and the command that fixes it."""
    try:
        return find_data_dir(data_dir, download=False)
    except DataError:
        if data_dir is not None or os.environ.get(ENV_VAR):
            raise  # the user chose a directory: install nothing behind their back
    looked = [f"{where}: {directory}" for where, directory in candidate_dirs()]
    print(f"Fashion-MNIST not found; installing the Debian package {DEBIAN_PACKAGE} ...", file=sys.stderr)
    why = apt_install()
    if why is None and _has_all(SYSTEM_DIR):
        return SYSTEM_DIR
    looked.append(f"apt-get install {DEBIAN_PACKAGE}: {why or f'installed, but {SYSTEM_DIR} lacks the files'}")
    target = cache_dir() / "fashion-mnist"
    print(f"downloading Fashion-MNIST from {URL} into {target} ...", file=sys.stderr)
    try:
        return download_fashion_mnist(target)
    except DataError as error:
        looked.append(f"download: {error}")
    raise DataError(
        "Fashion-MNIST is missing and could not be obtained. Looked: "
        + "; ".join(looked)
        + f". Fix: `sudo apt-get install -y {DEBIAN_PACKAGE}`, or download the four files "
        f"({', '.join(f for f, _, _ in FILES.values())}) from {URL} into a directory and "
        f"set {ENV_VAR} to it"
    )


def download_fashion_mnist(directory: Path, url: str = URL) -> Path:
    """Download the four archives from `url`, verify them, and write each atomically."""
    for file, digest, _ in FILES.values():
        if (directory / file).is_file():
            continue
        try:
            with urllib.request.urlopen(url + file, timeout=60) as response:
                data = response.read()
        except OSError as error:
            raise DataError(
                f"could not download {url + file} ({error}). Install the Debian package "
                f"dataset-fashion-mnist or pass --data-dir"
            ) from error
        _check_digest(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data, digest, url + file)
        atomic_write_bytes(directory / file, data)
    return directory


def _check_digest(payload: bytes, digest: str, source) -> None:
    actual = hashlib.sha256(payload).hexdigest()
    if actual != digest:
        raise DataError(
            f"{source} is corrupt: SHA-256 of its content is {actual}, expected {digest}. "
            f"Delete it and download again, or reinstall dataset-fashion-mnist"
        )


def read_idx(path: Path, digest: str, shape: tuple[int, ...]) -> np.ndarray:
    """A verified IDX file (gzip or raw) as a uint8 array of `shape`."""
    try:
        raw = path.read_bytes()
        payload = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"{path} cannot be read as a gzip IDX file: {error}") from error
    _check_digest(payload, digest, path)
    ndim = payload[3]
    dims = tuple(int.from_bytes(payload[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if payload[2] != 0x08 or dims != shape:
        raise DataError(
            f"{path}: expected an unsigned-byte IDX array of shape {shape}, found type {payload[2]:#x}, shape {dims}"
        )
    return np.frombuffer(payload, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(data_dir=None):
    """{"train_images", "train_labels", "test_images", "test_labels"} as uint8 arrays."""
    directory = find_data_dir(data_dir)
    return {name: read_idx(directory / file, digest, shape) for name, (file, digest, shape) in FILES.items()}


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of uint8 (N, 28, 28) images to (N, size, size) with Pillow."""
    from PIL import Image

    if size == images.shape[1]:
        return images
    return np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)) for image in images])


def load_resized(size: int, data_dir=None, progress: bool = False):
    """Fashion-MNIST at `size` x `size`, resized once and cached as .npz beside the download cache."""
    directory = find_data_dir(data_dir)
    key = hashlib.sha256(f"{size}:{[d for _, d, _ in FILES.values()]}".encode()).hexdigest()[:12]
    cached = cache_dir() / f"fashion-mnist-{size}-{key}.npz"
    if cached.is_file():
        try:
            with np.load(cached) as archive:
                return {name: archive[name] for name in FILES}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            print(
                f"note: the resized-data cache {cached} is damaged ({type(error).__name__}); rebuilding it",
                file=sys.stderr,
            )
    data = {name: read_idx(directory / file, digest, shape) for name, (file, digest, shape) in FILES.items()}
    for name in ("train_images", "test_images"):
        data[name] = resize_images(data[name], size)
    buffer = io.BytesIO()
    np.savez(buffer, **data)
    atomic_write_bytes(cached, buffer.getvalue())
    return data


def to_batch(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1], as torchvision's ToTensor."""
    return images[:, None].astype(np.float32) / 255.0


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch, the same in every backend and on resume."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batches(images, labels, batch_size: int, order=None, drop_last: bool = False):
    """(float32 NCHW batch, int64 labels) pairs in `order` (default: as stored)."""
    order = np.arange(len(images)) if order is None else order
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        yield to_batch(images[index]), labels[index].astype(np.int64)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m conformance.data", description="Fashion-MNIST set-up")
    parser.add_argument("--ensure", action="store_true", help="obtain Fashion-MNIST if it is missing")
    parser.add_argument("--data-dir", help="use this directory (nothing is installed)")
    args = parser.parse_args(argv)
    try:
        directory = ensure_data(args.data_dir) if args.ensure else find_data_dir(args.data_dir, download=False)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Fashion-MNIST: {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
