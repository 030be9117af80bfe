"""The interface every backend implements, and the words for devices and arithmetic.

Every backend package has a `backend.py` with a class `Backend(BackendBase)` that turns
framework objects into NumPy arrays and canonical state dicts, and a `Trainer` for its
optimiser, so that everything else (checks, CLI, training loop, reports) stays framework-free.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext

import numpy as np

from .data import to_batch
from .specs import to_layout

DEVICES = ("cpu", "gpu")
# Trainer arithmetic: exact float32 (TF32 off, JAX precision 'highest', as the checks need);
# the framework's fast float32 defaults (TF32 on Ampere and newer GPUs; on a CPU the same as
# fp32); mixed precision with bfloat16 compute and float32 parameters.
PRECISIONS = ("fp32", "tf32", "bf16")


class BackendUnavailable(RuntimeError):
    """The backend's framework is not installed (or cannot be imported here)."""


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; valid: {', '.join(DEVICES)} ('cuda' is accepted for gpu)")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")


def arithmetic_words(precision: str, on_gpu: bool, mixed: str) -> str:
    """What a trainer asked for `precision` computes in, in words; `mixed` names the
    framework's mixed-precision mechanism. TF32 is a GPU format: a CPU computes fp32."""
    check_precision(precision)
    if precision == "bf16":
        return f"bf16 ({mixed})"
    return "fp32 (TF32 exists only on GPUs)" if precision == "tf32" and not on_gpu else precision


class Trainer(ABC):
    """A model with its optimiser (SGD with optional momentum), in the framework's idiom.

    Two ways to train: `train_step` takes a NumPy batch and returns its loss and accuracy at
    once (the checks use it); the training loop's path keeps the data set on the device
    (`set_data`), steps on index batches without waiting for the device (`step_on`) and reads
    every step's loss and accuracy back in one transfer (`read_sums`). The defaults below run
    that path on the host through `train_step`; the framework backends keep it on the device.
    """

    precision = "fp32"  # one of PRECISIONS: what was asked for
    arithmetic = "fp32"  # what the steps really compute in, in words (e.g. what a CPU lacks)
    layout = "NCHW"  # the layout train_step takes

    def set_data(self, images: np.ndarray, labels: np.ndarray) -> None:
        """The training set, uint8 (N, H, W) images and integer labels, for `step_on`."""
        self.images, self.labels = images, labels
        self.reset_sums()

    def step_on(self, indices: np.ndarray) -> None:
        """One optimiser step on the examples `indices` of the set given to `set_data`."""
        loss, correct = self.train_step(
            to_layout(to_batch(self.images[indices]), self.layout), self.labels[indices].astype(np.int64)
        )
        self.record_step(loss, correct, len(indices))

    def reset_sums(self) -> None:
        self.step_losses, self.step_corrects, self.step_sizes = [], [], []

    def record_step(self, loss, correct, size: int) -> None:
        """Keep one step's mean loss and correct count (device values in the backends)."""
        self.step_losses.append(loss)
        self.step_corrects.append(correct)
        self.step_sizes.append(size)

    def fetch(self, values: list) -> np.ndarray:
        """The per-step values kept by record_step, as one NumPy array (one device transfer)."""
        return np.asarray(values)

    def activation_bytes(self, indices: np.ndarray) -> tuple[int, str] | None:
        """The framework's own measure of the memory a step on the examples `indices` keeps for
        its backward pass: (bytes, what was measured), or None where it has none. The model's
        weights and running statistics are left as they were."""
        return None

    def wait(self) -> None:
        """Block until every step queued so far has finished on the device, the optimiser's
        updates included, not only the losses read back (here: nothing is queued)."""
        return None

    def read_sums(self) -> tuple[float, int, int, list[float]]:
        """(loss sum, correct predictions, examples seen, every step's mean loss) since the last
        read, and start again: the only point where the training loop waits for the device."""
        if not self.step_sizes:
            return 0.0, 0, 0, []
        self.wait()
        losses = self.fetch(self.step_losses).astype(np.float64)
        corrects = self.fetch(self.step_corrects).astype(np.int64)
        sizes = np.asarray(self.step_sizes)
        self.reset_sums()
        batch_losses = [float(loss) for loss in losses]
        loss_sum = sum(loss * size for loss, size in zip(batch_losses, sizes.tolist()))
        return float(loss_sum), int(corrects.sum()), int(sizes.sum()), batch_losses

    @abstractmethod
    def train_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
        """One optimiser step on a native-layout float32 batch; (mean loss, correct predictions)."""

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Eval-mode logits for a native-layout batch."""

    @abstractmethod
    def export_optimizer_state(self) -> dict[str, np.ndarray]:
        """Momentum buffers in PyTorch's convention (buf = m * buf + g), keyed by canonical name,
        PyTorch layout; {} without momentum. A backend that converts from another convention
        exports float64, so that loading the export restores its own state bit for bit."""

    @abstractmethod
    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what export_optimizer_state returned."""


class BackendBase(ABC):
    """What every backend offers the framework-free code.

    Inputs are native-layout NumPy batches of the model's dtype (`layout` says which); states, gradients
    and optimiser buffers are canonical dicts (torchvision names, PyTorch layout).
    """

    name: str
    layout: str  # "NCHW" or "NHWC"
    running_var: str  # "unbiased" (PyTorch) or "biased" (MXNet, Keras, Flax)
    # MXNet hands the learning rate and the BatchNorm momentum to its kernels as 32-bit
    # floats, even for a float64 model; the float64 checks then expect the step that the
    # rounded values give.
    float32_hyperparameters = False

    def __init__(self, device: str = "cpu"):
        self.requested_device = device
        self.device_note = ""  # why the backend runs elsewhere than asked, if it does

    @property
    @abstractmethod
    def device_name(self) -> str:
        """Where this backend computes, in words ("cpu", "cuda:0 NVIDIA H100 80GB HBM3")."""

    @abstractmethod
    def build(self, spec, dtype: str = "float32", memory_efficient: bool = False) -> object:
        """The framework's model for `spec`, with parameters allocated (no dummy call needed).

        dtype "float64" is for the exact-arithmetic conformance checks; inputs then come in
        float64 and states, gradients and logits go out in float64. `memory_efficient`
        (torchvision's name) recomputes each dense layer's concatenation and first
        BN-ReLU-Conv in the backward pass instead of keeping them: the same parameters and
        the same numbers, less activation memory, more time."""

    def dtype_scope(self, dtype: str):
        """A context in which models of `dtype` compute in exactly that dtype, whatever ran
        before in the process (JAX's 64-bit switch is process-wide); the checks run each dtype
        inside it. Frameworks whose dtype lives in the model need nothing."""
        return nullcontext()

    @abstractmethod
    def load_state(self, model, state: dict[str, np.ndarray]) -> None:
        """Load a canonical state; CheckpointError on missing, unexpected or mis-shaped keys."""

    @abstractmethod
    def export_state(self, model) -> dict[str, np.ndarray]:
        """The model's canonical state."""

    @abstractmethod
    def count_params(self, model) -> tuple[int, int]:
        """(trainable, non-trainable) parameter counts as the framework reports them."""

    @abstractmethod
    def stage_shapes(self, model, x: np.ndarray) -> dict[str, tuple[int, ...]]:
        """Output shape of every stage (stem, denseblockN, transitionN, logits), native layout."""

    @abstractmethod
    def forward(self, model, x: np.ndarray, train: bool) -> np.ndarray:
        """Logits; in train mode BatchNorm normalises with batch statistics (whether a forward
        pass alone also moves the running statistics differs between frameworks)."""

    @abstractmethod
    def train_pass(self, model, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, dict[str, np.ndarray]]:
        """One train-mode pass, as a training step makes it: the logits, the mean cross-entropy
        and the gradient of every trainable parameter (canonical); it moves the running
        statistics once."""

    def gradients(self, model, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """train_pass without the logits."""
        _, loss, grads = self.train_pass(model, x, y)
        return loss, grads

    @abstractmethod
    def make_trainer(
        self, model, lr: float, momentum: float = 0.0, precision: str = "fp32", compile: bool = False
    ) -> Trainer:
        """An SGD trainer for `model` (the framework's own optimiser).

        `precision` (one of PRECISIONS) is the trainer's own: the backend keeps exact float32
        for everything else in the process (the checks). `compile` asks for the framework's
        optional compiler (torch.compile); the others always compile their steps."""
