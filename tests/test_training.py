"""Training: a short run per backend, resume after a kill mid-epoch, cross-backend evaluation."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import resized_data

from conformance import data, training, weights
from conformance.specs import to_layout
from conformance.training import Recipe, TrainingError

pytestmark = pytest.mark.skipif(
    not data._has_all(data.SYSTEM_DIR), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)

# Small enough for seconds per backend on two cores; momentum so that resuming must restore
# the optimiser state as well as the weights.
RECIPE = Recipe("test", size=16, batch_size=32, lr=0.1, momentum=0.9, epochs=3, train_examples=1024, test_examples=500)
ARCH = "tiny_d2l"


resized_cache = resized_data(RECIPE.size)


def test_short_run_learns_and_writes_every_epoch(backend, tmp_path):
    record = training.train(backend, ARCH, RECIPE, tmp_path, progress=False)
    epochs = record["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert epochs[-1]["test_acc"] > 0.4  # chance is 0.1
    assert json.loads((tmp_path / "metrics.json").read_text()) == record
    for epoch in (1, 2, 3):
        state = weights.load_state(tmp_path / f"checkpoints/epoch-{epoch:03d}.safetensors")
        assert set(state) == set(weights.init_state(training.fashion_mnist_spec(ARCH)))
    final = weights.load_state(tmp_path / "model.safetensors")
    last = weights.load_state(tmp_path / "checkpoints/epoch-003.safetensors")
    assert all(np.array_equal(final[k], last[k]) for k in final)


RUNNER = textwrap.dedent("""
    import os, signal, sys
    from conformance import training
    from conformance.backends import load_backend
    backend, out, resume, kill = sys.argv[1], sys.argv[2], sys.argv[3] == "resume", sys.argv[4] == "kill"
    def kill_mid_epoch_2(epoch, step):
        if kill and epoch == 2 and step == 5:
            os.kill(os.getpid(), signal.SIGKILL)
    training.train(load_backend(backend), "__ARCH__", training.Recipe(**__RECIPE__), out, resume=resume,
                   progress=False, on_step=kill_mid_epoch_2)
""")


def run_training(backend, out, resume=False, kill=False):
    """Each run in a fresh process, as a user would run it (and with the same thread count:
    frameworks' CPU reductions, hence their last bits, depend on it)."""
    import dataclasses

    script = RUNNER.replace("__RECIPE__", repr(dataclasses.asdict(RECIPE))).replace("__ARCH__", ARCH)
    return subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            backend.name,
            str(out),
            "resume" if resume else "fresh",
            "kill" if kill else "run",
        ],
        capture_output=True,
        text=True,
    )


def test_resume_after_kill_mid_epoch_loses_no_completed_epoch(backend, tmp_path):
    killed = run_training(backend, tmp_path / "run", kill=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    partial = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [e["epoch"] for e in partial["epochs"]] == [1]

    with pytest.raises(TrainingError, match="already holds a run.*--resume"):
        training.train(backend, ARCH, RECIPE, tmp_path / "run", progress=False)
    for result in (run_training(backend, tmp_path / "run", resume=True), run_training(backend, tmp_path / "straight")):
        assert result.returncode == 0, result.stderr[-2000:]

    resumed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert resumed["epochs"][0] == partial["epochs"][0]
    a = weights.load_state(tmp_path / "run" / "model.safetensors")
    b = weights.load_state(tmp_path / "straight" / "model.safetensors")
    for key in a:  # same batches, same state: the interruption changes nothing
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert [e["test_acc"] for e in resumed["epochs"]] == [e["test_acc"] for e in straight["epochs"]]


def test_resume_refuses_another_recipe(tmp_path):
    from conformance.backends import load_backend

    backend = load_backend("reference")
    tiny = RECIPE.replace(epochs=1, train_examples=32, test_examples=32)
    training.train(backend, ARCH, tiny, tmp_path, progress=False)
    with pytest.raises(TrainingError, match="another architecture or recipe"):
        training.train(backend, ARCH, tiny.replace(lr=0.5), tmp_path, resume=True, progress=False)


def test_a_branch_continues_as_the_run_it_came_from(tmp_path):
    """`branch` starts a run from another's epoch (make conformance continues the single-device
    run on 2 devices): continued alike, it ends where the original did."""
    from conformance.backends import load_backend

    backend = load_backend("reference")
    short = RECIPE.replace(epochs=2, train_examples=64, test_examples=32)
    original = training.train(backend, ARCH, short, tmp_path / "original", progress=False)
    training.branch(tmp_path / "original", tmp_path / "branch", 1)
    start = json.loads((tmp_path / "branch" / "metrics.json").read_text())
    assert [e["epoch"] for e in start["epochs"]] == [1] and start["branched_from"]["epoch"] == 1
    continued = training.train(backend, ARCH, short, tmp_path / "branch", resume=True, progress=False)
    assert continued["epochs"][0] == original["epochs"][0]
    # The reference trains in float64 and checkpoints hold float32: the continued epoch starts
    # from weights rounded to float32, so its losses agree to about float32's precision.
    np.testing.assert_allclose(continued["epochs"][1]["batch_losses"], original["epochs"][1]["batch_losses"], rtol=1e-6)
    assert continued["epochs"][1]["test_acc"] == original["epochs"][1]["test_acc"]
    with pytest.raises(TrainingError, match="already exists"):
        training.branch(tmp_path / "original", tmp_path / "branch", 1)
    with pytest.raises(TrainingError, match="cannot branch from epoch 3 .* holds 2 completed"):
        training.branch(tmp_path / "original", tmp_path / "other", 3)


@pytest.fixture(scope="module")
def torch_checkpoint(tmp_path_factory):
    from conftest import backend_or_skip

    backend = backend_or_skip("torch")
    out = tmp_path_factory.mktemp("torch-run")
    record = training.train(backend, ARCH, RECIPE.replace(epochs=1), out, progress=False)
    return out / "model.safetensors", record["epochs"][-1]["test_acc"]


def test_checkpoint_from_torch_evaluates_the_same_in_every_backend(backend, torch_checkpoint):
    path, torch_acc = torch_checkpoint
    result = training.evaluate_checkpoint(
        backend, path, batch_size=RECIPE.batch_size, test_examples=RECIPE.test_examples
    )
    assert result["size"] == RECIPE.size and result["examples"] == RECIPE.test_examples
    # Float32 logits agree to ~1e-6 across backends; an argmax could flip only on a near-tie.
    assert abs(result["test_acc"] - torch_acc) <= 1 / RECIPE.test_examples


# The training loop's path (data on the device, index batches, sums read once) against the
# plain one (a NumPy batch per train_step): the same batches must give the same steps.


def two_trainers(backend, precision="fp32"):
    spec = training.fashion_mnist_spec(ARCH)
    trainers = []
    for _ in range(2):
        model = backend.build(spec)
        backend.load_state(model, weights.init_state(spec, 0))
        trainers.append((model, backend.make_trainer(model, RECIPE.lr, RECIPE.momentum, precision=precision)))
    return trainers


def test_speed_path_takes_the_same_steps_as_train_step(backend):
    resized = data.load_resized(RECIPE.size)
    images, labels = resized["train_images"][:200], resized["train_labels"][:200]
    order = data.epoch_order(len(images), seed=0, epoch=1)
    (fast_model, fast), (plain_model, plain) = two_trainers(backend)
    fast.set_data(images, labels)
    plain_losses, plain_correct = [], 0
    for x, y in data.batches(images, labels, 64, order):  # three full batches and a ragged one
        loss, correct = plain.train_step(to_layout(x, backend.layout), y)
        plain_losses.append(loss)
        plain_correct += correct
    for first in range(0, len(order), 64):
        fast.step_on(order[first : first + 64])
    loss_sum, correct, seen, batch_losses = fast.read_sums()
    assert seen == len(images) and correct == plain_correct
    np.testing.assert_allclose(batch_losses, plain_losses, rtol=1e-6)
    np.testing.assert_allclose(loss_sum, sum(loss * 64 for loss in plain_losses[:3]) + plain_losses[3] * 8, rtol=1e-6)
    assert fast.read_sums() == (0.0, 0, 0, [])  # read_sums starts again
    a, b = backend.export_state(fast_model), backend.export_state(plain_model)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert fast.export_optimizer_state().keys() == plain.export_optimizer_state().keys()


def test_bf16_run_is_finite_and_recorded(backend, tmp_path):
    recipe = RECIPE.replace(epochs=1, train_examples=256, test_examples=64)
    record = training.train(backend, ARCH, recipe, tmp_path, progress=False, precision="bf16")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["precision"] == record["precision"] == "bf16"
    # MXNet 1.9 has no bfloat16 training path: it runs float32 and says so.
    assert saved["arithmetic"].startswith("fp32 (bf16 asked" if backend.name == "mxnet" else "bf16 (")
    assert np.isfinite(saved["epochs"][0]["batch_losses"]).all()


def test_unknown_precision_is_refused(backend):
    spec = training.fashion_mnist_spec(ARCH)
    with pytest.raises(ValueError, match="unknown precision 'fp16'; valid: fp32, tf32, bf16"):
        backend.make_trainer(backend.build(spec), 0.1, precision="fp16")


def test_precision_flag_reaches_metrics(tmp_path, capsys):
    from conftest import backend_or_skip

    from conformance.cli import main

    backend_or_skip("torch")
    argv = [
        "train",
        "--backend",
        "torch",
        "--arch",
        ARCH,
        "--size",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--train-examples",
        "64",
        "--test-examples",
        "32",
        "--out",
        str(tmp_path),
        "--quiet",
        "--precision",
        "tf32",
    ]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["precision"] == "tf32" and saved["arithmetic"] == "fp32 (TF32 exists only on GPUs)"
    assert json.loads(capsys.readouterr().out)["arithmetic"] == saved["arithmetic"]


def test_diverging_run_stops_at_the_first_non_finite_loss(tmp_path):
    from conftest import backend_or_skip

    backend = backend_or_skip("torch")
    with pytest.raises(TrainingError, match=r"diverged: the loss is (nan|inf) at epoch 1, step \d+;.*lower --lr"):
        training.train(backend, ARCH, RECIPE.replace(lr=1e8, momentum=0.0, epochs=1), tmp_path, progress=False)
    assert not (tmp_path / "metrics.json").exists()  # nothing committed


def test_divergence_leaves_the_last_good_checkpoint_resumable(tmp_path, monkeypatch):
    from conftest import backend_or_skip

    backend = backend_or_skip("torch")
    recipe = RECIPE.replace(epochs=2, train_examples=256, test_examples=64)
    make_trainer = backend.make_trainer

    def poisoned(*args, **kwargs):  # the third loss of epoch 2 reads back as NaN
        trainer = make_trainer(*args, **kwargs)
        read_sums = trainer.read_sums

        def read():
            loss_sum, correct, seen, losses = read_sums()
            if trainer.epochs_read == 1:
                losses[2] = float("nan")
            trainer.epochs_read += 1
            return loss_sum, correct, seen, losses

        trainer.epochs_read, trainer.read_sums = 0, read
        return trainer

    monkeypatch.setattr(backend, "make_trainer", poisoned)
    with pytest.raises(
        TrainingError,
        match=r"loss is nan at epoch 2, step 3; the last good checkpoint, epoch 1, "
        r"is intact .*--resume",
    ):
        training.train(backend, ARCH, recipe, tmp_path, progress=False)
    assert [e["epoch"] for e in json.loads((tmp_path / "metrics.json").read_text())["epochs"]] == [1]
    monkeypatch.setattr(backend, "make_trainer", make_trainer)
    resumed = training.train(backend, ARCH, recipe, tmp_path, resume=True, progress=False)
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]
