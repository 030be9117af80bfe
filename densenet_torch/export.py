"""The PyTorch DenseNet in deployment formats: torch.export's `.pt2` (native) and ONNX.

Both trace the eval-mode network at one input size with a dynamic batch axis.
"""

import io

import torch

from conformance.files import atomic_write_bytes

EXPORTER = f"torch.onnx.export(dynamo=True), torch {torch.__version__}"
NATIVE_SUFFIX = ".pt2"


def example_input(model, size):
    return torch.zeros(2, model.spec.in_channels, size, size, dtype=model.classifier.weight.dtype)


def dynamic_batch():
    return {"X": {0: torch.export.Dim("batch")}}


def save_native(model, path, size):
    program = torch.export.export(model.eval(), (example_input(model, size),), dynamic_shapes=dynamic_batch())
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_native(path):
    """The saved program as a function from a NumPy batch to NumPy logits."""
    module = torch.export.load(path).module()
    return lambda x: module(torch.from_numpy(x)).detach().numpy()


def export_onnx(model, path, size):
    program = torch.onnx.export(
        model.eval(),
        (example_input(model, size),),
        dynamo=True,
        dynamic_shapes=dynamic_batch(),
        input_names=["input"],
        output_names=["logits"],
        verbose=False,
    )
    atomic_write_bytes(path, program.model_proto.SerializeToString())
