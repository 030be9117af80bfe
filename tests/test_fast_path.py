"""The trainers' fast path: no host sync inside an epoch, a barrier at every read, data and
arithmetic where they were asked for. The GPU-only parts are marked `gpu` (pytest -m gpu)."""

import numpy as np
import pytest
from conftest import backend_or_skip

from conformance import data, training, weights

ARCH, SIZE, BATCH = "tiny_d2l", 16, 16


def trainer_for(backend, precision="fp32", momentum=0.9):
    spec = training.fashion_mnist_spec(ARCH)
    model = backend.build(spec)
    backend.load_state(model, weights.init_state(spec, 0))
    trainer = backend.make_trainer(model, 0.1, momentum, precision=precision)
    rng = np.random.default_rng(0)
    trainer.set_data(rng.integers(0, 256, (64, SIZE, SIZE), dtype=np.uint8), rng.integers(0, 10, 64))
    return model, trainer


def batches(count=3):
    rng = np.random.default_rng(1)
    return [rng.permutation(64)[:BATCH] for _ in range(count)]


def test_every_read_waits_for_the_device(backend, monkeypatch):
    _, trainer = trainer_for(backend)
    waits = []
    real_wait = trainer.wait
    monkeypatch.setattr(trainer, "wait", lambda: waits.append(real_wait()))
    for indices in batches():
        trainer.step_on(indices)
    assert waits == []  # steps queue work and do not wait
    _, _, seen, losses = trainer.read_sums()
    assert waits == [None] and seen == 3 * BATCH and np.isfinite(losses).all()


HOST_READS = ("item", "cpu", "numpy", "tolist", "__bool__", "__float__", "__int__")


def test_torch_steps_read_nothing_back_to_the_host(monkeypatch):
    torch = pytest.importorskip("torch")
    _, trainer = trainer_for(backend_or_skip("torch"))
    reads = []
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor,
            name,
            lambda self, *a, _real=real, _name=name, **k: reads.append(_name) or _real(self, *a, **k),
        )
    for indices in batches():
        trainer.step_on(indices)
    assert reads == [], f"step_on read back to the host: {reads}"
    trainer.read_sums()
    assert reads, "the counting hook saw no read at all: it counts nothing"


def test_torch_fused_sgd_takes_the_default_steps():
    torch = pytest.importorskip("torch")
    from densenet_torch.train import sgd

    backend = backend_or_skip("torch")
    spec = training.fashion_mnist_spec(ARCH)
    states = []
    for fused in (False, True):
        model = backend.build(spec)
        backend.load_state(model, weights.init_state(spec, 0))
        optimizer = sgd(model, 0.1, 0.9, fused=fused)
        X = torch.from_numpy(np.random.default_rng(2).standard_normal((8, 1, SIZE, SIZE), dtype=np.float32))
        for _ in range(3):
            optimizer.zero_grad()
            model(X).square().mean().backward()
            optimizer.step()
        states.append(backend.export_state(model))
    for key in states[0]:
        np.testing.assert_allclose(states[1][key], states[0][key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_jax_steps_make_no_implicit_transfer():
    jax = pytest.importorskip("jax")
    _, trainer = trainer_for(backend_or_skip("jax"))
    with jax.transfer_guard("disallow"):  # explicit device_put only; float(loss) would raise
        for indices in batches():
            trainer.step_on(indices)
        trainer.wait()
    assert trainer.read_sums()[2] == 3 * BATCH


@pytest.mark.skipif(not data._has_all(data.SYSTEM_DIR), reason="Fashion-MNIST not installed")
def test_jax_float32_training_after_float64_work_is_32_bit(tmp_path):
    jax = pytest.importorskip("jax")
    backend = backend_or_skip("jax")
    backend.build(training.fashion_mnist_spec(ARCH), "float64")  # leaves jax_enable_x64 on for the process
    assert jax.config.jax_enable_x64
    seen = []
    recipe = training.Recipe("t", size=SIZE, batch_size=32, lr=0.1, momentum=0.0, epochs=1, train_examples=64)
    training.train(
        backend,
        ARCH,
        recipe.replace(test_examples=32),
        tmp_path,
        progress=False,
        on_step=lambda epoch, step: seen.append(jax.config.jax_enable_x64),
    )
    assert seen == [False, False]
    assert jax.config.jax_enable_x64  # and as it was afterwards


def test_tf_batches_are_gathered_on_the_model_device():
    pytest.importorskip("tensorflow")
    model, trainer = trainer_for(backend_or_skip("tf"))
    assert trainer.images.dtype.name == "float16"  # GatherV2 has GPU kernels for it, not for uint8
    device = model.trainable_variables[0].value.device
    assert trainer.images.device == device


@pytest.mark.gpu
def test_torch_gpu_steps_never_synchronise():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _, trainer = trainer_for(backend_or_skip("torch", "gpu"), precision="tf32")
    assert torch.backends.cudnn.benchmark and trainer.channels_last
    assert trainer.optimizer.defaults["fused"]
    trainer.step_on(batches(1)[0])  # the first step may allocate and autotune
    torch.cuda.set_sync_debug_mode("error")
    try:
        for indices in batches():
            trainer.step_on(indices)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer.read_sums()


@pytest.mark.gpu
def test_tf_gpu_gathers_on_the_gpu():
    tf = pytest.importorskip("tensorflow")
    if not tf.config.list_physical_devices("GPU"):
        pytest.skip("no GPU visible to TensorFlow")
    _, trainer = trainer_for(backend_or_skip("tf", "gpu"))
    assert "GPU" in trainer.images.device
    trainer.step_on(batches(1)[0])
    assert trainer.read_sums()[2] == BATCH


def test_own_activation_measure_sees_the_recomputation(backend):
    """Each framework's own measure of what a step keeps for its backward pass (bench's memory
    section): less for the memory-efficient model; the weights and statistics left as they were."""
    spec = training.fashion_mnist_spec("densenet_bc100_k12")
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (8, 32, 32), dtype=np.uint8), rng.integers(0, 10, 8)
    measured = {}
    for memory_efficient in (False, True):
        model = backend.build(spec, memory_efficient=memory_efficient)
        backend.load_state(model, weights.init_state(spec, 0))
        trainer = backend.make_trainer(model, 0.1)
        trainer.set_data(images, labels)
        before = backend.export_state(model)
        measured[memory_efficient] = trainer.activation_bytes(np.arange(8))
        after = backend.export_state(model)
        assert all(np.array_equal(before[key], after[key]) for key in before)
    if backend.name == "mxnet":  # no measure of its own on a CPU, and no mechanism
        assert measured == {False: None, True: None}
        return
    (plain, kind), (efficient, _) = measured[False], measured[True]
    assert kind and 0 < efficient < 0.8 * plain
