"""What the data-parallel command-line tests share: one tiny run of `densenet-xf train
--devices 2`, and the training loop's own batches for replaying that run in the reference."""

import json
from functools import partial

import numpy as np

from conformance import data, reference, training, weights
from conformance.cli import main
from conformance.suite import parallel

RECIPE = training.Recipe(
    "test", size=16, batch_size=32, lr=0.1, momentum=0.0, epochs=1, train_examples=128, test_examples=32
)
ARCH = "tiny_d2l"


def train_argv(backend, out, *extra) -> list[str]:
    """`densenet-xf train` with the tiny recipe (`extra` flags come last, and win)."""
    return [
        "train",
        "--backend",
        backend,
        "--arch",
        ARCH,
        "--size",
        str(RECIPE.size),
        "--epochs",
        "1",
        "--batch-size",
        str(RECIPE.batch_size),
        "--lr",
        str(RECIPE.lr),
        "--momentum",
        "0",
        "--train-examples",
        str(RECIPE.train_examples),
        "--test-examples",
        str(RECIPE.test_examples),
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


def train_on_two_devices(backend, out, capfd, *extra) -> tuple[dict, dict]:
    """Run the tiny recipe on 2 devices; (what the command printed, its metrics.json)."""
    assert main(train_argv(backend, out, "--devices", "2", *extra)) == 0
    printed = json.loads(capfd.readouterr().out)
    saved = json.loads((out / "metrics.json").read_text())
    assert printed["devices"] == saved["devices"] == 2
    assert printed["bn_semantics"] == saved["bn_semantics"]
    return printed, saved


def loop_batches(epoch=1):
    """(spec, initial state, the epoch's batches in the training loop's order)."""
    spec = training.fashion_mnist_spec(ARCH)
    images, labels, _, _ = training.load_dataset(RECIPE)
    order = data.epoch_order(len(images), RECIPE.seed, epoch)
    batches = [
        (data.to_batch(images[i]), labels[i].astype(np.int64)) for i in np.split(order, len(order) // RECIPE.batch_size)
    ]
    return spec, weights.init_state(spec, RECIPE.seed), batches


def float32_tolerances(spec, state, batches, expected, losses, lr=RECIPE.lr, devices=2, **engine) -> dict:
    """{check: tolerance} of the data-parallel check's float32 rows (conformance.suite.parallel),
    derived for these steps: `engine` names bn, running_stats, running_var and momentum."""
    train = partial(reference.data_parallel_train, spec, state, lr=lr, devices=devices, **engine)
    derived = parallel.float32_tolerances(train, state, batches, (expected, losses))
    return {check: tolerance for check, (tolerance, _) in derived.items()}
