"""PyTorch-specific behaviour; the shared contract is in test_backends.py."""

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

from conformance import specs, weights  # noqa: E402
from conformance.specs import ARCHS, InputError  # noqa: E402
from densenet_torch import DenseBlock, DenseNet, conv_block, export_canonical, load_canonical, transition_block  # noqa: E402
from densenet_torch.model import MemoryEfficientDenseBlock  # noqa: E402


def test_d2l_dense_block_and_transition_shapes():
    blk = DenseBlock(2, 3, 10)
    Y = blk(torch.randn(4, 3, 8, 8))
    assert Y.shape == (4, 23, 8, 8)
    assert transition_block(23, 10)(Y).shape == (4, 10, 4, 4)


def test_conv_block_is_bn_relu_conv():
    block = conv_block(3, 10)
    assert [type(m).__name__ for m in block] == ["BatchNorm2d", "ReLU", "Conv2d"]
    assert block.conv1.padding == (1, 1)
    bottleneck = conv_block(3, 10, bn_size=4)
    assert bottleneck.conv1.out_channels == 40 and bottleneck.conv2.kernel_size == (3, 3)


def test_state_dict_keys_are_the_canonical_keys():
    for arch in ("d2l", "densenet121", "densenet40_k12"):
        keys = [k for k in DenseNet(arch).state_dict() if not k.endswith("num_batches_tracked")]
        assert keys == list(specs.parameter_table(ARCHS[arch]))


def test_batch_norm_settings_are_explicit():
    bn = DenseNet("tiny").features.norm0
    assert bn.eps == 1e-5 and bn.momentum == 0.1


def test_load_torchvision_style_state_dict_with_batch_counters():
    model = DenseNet("tiny")
    state = {k: torch.from_numpy(v) for k, v in weights.init_state(ARCHS["tiny"], randomize_bn=True).items()}
    state["features.norm0.num_batches_tracked"] = torch.tensor(3)
    load_canonical(model, {k: v.numpy() for k, v in state.items()})
    assert (
        export_canonical(model)["features.norm0.weight"].tobytes() == state["features.norm0.weight"].numpy().tobytes()
    )


def test_module_call_validates_input():
    model = DenseNet("d2l").eval()
    with pytest.raises(InputError, match="too small for d2l.*29x29"):
        model(torch.zeros(1, 1, 28, 28))
    with pytest.raises(InputError, match="looks like NHWC"):
        model(torch.zeros(1, 96, 96, 1))
    with pytest.raises(InputError, match="expects float64 input, got float32"):
        model.double()(torch.zeros(1, 1, 96, 96))


def test_dropout_is_active_only_in_training():
    model = DenseNet(ARCHS["tiny"].replace(drop_rate=0.5))
    x = torch.randn(2, 3, 19, 19)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.equal(a, model(x))


def test_a_fast_trainer_switches_tf32_for_its_own_steps_only():
    from conformance.backends import load_backend
    from conformance.suite import checks

    backend, spec = load_backend("torch"), ARCHS["tiny_d2l"]
    x, y = checks.make_batch(spec, 13, 2, 0)
    seen = []
    for precision in ("fp32", "tf32", "bf16"):
        model = backend.build(spec)
        model.register_forward_hook(lambda m, i, o: seen.append(torch.backends.cudnn.allow_tf32))
        backend.make_trainer(model, 0.1, precision=precision).train_step(x, y)
    assert seen == [False, True, True]
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert checks.all_passed(checks.compare_with_reference(backend, spec, 13, 2, 0, ("float32",)))


# Memory-efficient DenseNet: the same network, its concatenations and first BN-ReLU recomputed.


def test_memory_efficient_model_passes_the_conformance_checks():
    from conformance.backends import load_backend
    from conformance.suite import checks

    backend = load_backend("torch")
    for arch, size in (("tiny", 19), ("tiny_d2l", 13)):
        results = checks.compare_with_reference(backend, arch, size, 2, 0, memory_efficient=True)
        assert checks.all_passed(results), (arch, results)


def test_one_canonical_state_loads_into_plain_and_memory_efficient_models():
    from conformance.backends import load_backend

    backend, state = load_backend("torch"), weights.init_state(ARCHS["tiny"], randomize_bn=True)
    plain, efficient = DenseNet("tiny"), DenseNet("tiny", memory_efficient=True)
    assert backend.count_params(plain) == backend.count_params(efficient)
    for model in (plain, efficient):
        load_canonical(model, state)
    x = torch.randn(2, 3, 19, 19)
    assert torch.equal(plain.eval()(x), efficient.eval()(x))


def train_step_outputs(model, x, seed):
    torch.manual_seed(seed)
    logits = model.train()(x)
    logits.square().sum().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


def test_memory_efficient_dropout_draws_the_plain_masks_and_moves_statistics_once():
    spec = ARCHS["tiny"].replace(drop_rate=0.5)
    state = weights.init_state(spec, randomize_bn=True)
    plain, efficient = DenseNet(spec), DenseNet(spec, memory_efficient=True)
    for model in (plain, efficient):
        load_canonical(model, state)
    x = torch.randn(2, 3, 19, 19)
    (plain_logits, plain_grads), (logits, grads) = (train_step_outputs(m, x, seed=3) for m in (plain, efficient))
    assert torch.equal(plain_logits, logits)
    assert all(torch.equal(plain_grads[name], grads[name]) for name in grads)
    assert all(torch.equal(a, b) for a, b in zip(plain.buffers(), efficient.buffers()))
    assert efficient.features.denseblock1.denselayer1.norm1.num_batches_tracked.item() == 1


def kept_bytes(model, x):
    """Bytes of the tensors a train-mode forward pass leaves alive for the backward pass:
    every op's output storage that is still referenced, except parameters, buffers and logits."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class RecordOutputs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.storages = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for storage in (t.untyped_storage() for t in tree_leaves(out) if isinstance(t, torch.Tensor)):
                self.storages[storage.data_ptr()] = StorageWeakRef(storage), storage.nbytes()
            return out

    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    with RecordOutputs() as recorded:
        logits = model.train()(x)
    alive = (nbytes for ptr, (ref, nbytes) in recorded.storages.items() if not ref.expired() and ptr not in owned)
    return sum(alive) - logits.untyped_storage().nbytes()


def test_memory_efficient_model_keeps_under_half_the_activations_of_a_deep_net():
    x = torch.randn(2, 3, 16, 16)
    plain = kept_bytes(DenseNet("densenet_bc100_k12"), x)
    efficient = kept_bytes(DenseNet("densenet_bc100_k12", memory_efficient=True), x)
    assert efficient < 0.5 * plain, f"memory-efficient keeps {efficient / plain:.0%} of the plain model's activations"


def test_zoo_constructor_builds_the_memory_efficient_model():
    from densenet_torch.zoo import densenet121

    model = densenet121(memory_efficient=True)
    blocks = [m for m in model.modules() if isinstance(m, DenseBlock)]
    assert len(blocks) == 4 and all(isinstance(block, MemoryEfficientDenseBlock) for block in blocks)


def test_memory_efficient_model_scripts_without_its_recomputation():
    model = DenseNet("tiny", memory_efficient=True).eval()
    X = torch.randn(2, 3, 19, 19)
    assert torch.equal(torch.jit.script(model)(X), model(X))
