"""One backend's view of the machine, in a process of its own (frameworks never share one):

    python -m conformance.gpucheck.probe --backend torch --device gpu --out environment/torch.json

The framework's and its companions' versions (from the installed distributions), where the
backend computes and why it falls back, if it does, and one tiny net's forward pass there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import numpy as np

from .. import environment, specs, training
from ..backends import load_backend
from ..files import atomic_write_text
from ..interface import BackendUnavailable

PROBE_ARCH, PROBE_SIZE, PROBE_BATCH = "tiny", 19, 2


def time_steps(backend, recipe: training.Recipe, precision: str, steps: int) -> dict:
    """The trainer's seconds per step at the recipe's net, size and batch, on random images held
    on the device, through the training loop's own path (set_data, step_on, read_sums): the
    first step (compilation, allocation) apart from the next `steps`."""
    spec = training.fashion_mnist_spec("d2l")
    trainer = backend.make_trainer(backend.build(spec), recipe.lr, recipe.momentum, precision=precision)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2 * recipe.batch_size, recipe.size, recipe.size), dtype=np.uint8)
    trainer.set_data(images, rng.integers(0, 10, len(images)))
    batches = [rng.permutation(len(images))[: recipe.batch_size] for _ in range(steps + 1)]
    start = time.perf_counter()
    trainer.step_on(batches[0])
    trainer.read_sums()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for indices in batches[1:]:
        trainer.step_on(indices)
    trainer.read_sums()
    return {
        "recipe": recipe.name,
        "size": recipe.size,
        "batch": recipe.batch_size,
        "precision": precision,
        "arithmetic": trainer.arithmetic,
        "first_step_s": first,
        "steps": steps,
        "step_s": (time.perf_counter() - start) / steps,
    }


def probe(name: str, device: str, recipe: training.Recipe | None = None, precision: str = "fp32", steps: int = 10):
    started = time.perf_counter()
    versions = {r.distribution: environment.version(r) for r in environment.FRAMEWORKS.get(name, ())}
    result = {"backend": name, "requested_device": device, "versions": versions}
    try:
        backend = load_backend(name, device)
    except BackendUnavailable as error:
        return {**result, "status": "skipped", "reason": str(error)}
    result.update(device=backend.device_name, device_note=backend.device_note, import_s=time.perf_counter() - started)
    spec = specs.get_spec(PROBE_ARCH)
    x = specs.to_layout(np.ones((PROBE_BATCH, spec.in_channels, PROBE_SIZE, PROBE_SIZE), np.float32), backend.layout)
    start = time.perf_counter()
    logits = backend.forward(backend.build(spec), x, train=False)
    result.update(
        status="ok",
        forward={"arch": PROBE_ARCH, "shape": list(logits.shape), "finite": bool(np.isfinite(logits).all())},
        forward_s=time.perf_counter() - start,
    )
    if recipe is not None:
        result["step_time"] = time_steps(backend, recipe, precision, steps)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.gpucheck.probe")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--device", default="gpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--recipe", help="also time the trainer's steps at this recipe's net, size and batch")
    parser.add_argument("--size", type=int, help="override the recipe's size")
    parser.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the first")
    args = parser.parse_args(argv)
    recipe = None
    if args.recipe:
        recipe = training.get_recipe(args.recipe).replace(size=args.size, batch_size=args.batch_size)
    try:
        result = probe(args.backend, args.device, recipe, args.precision, args.steps)
    except Exception as error:  # recorded: the check goes on with the other phases
        result = {
            "backend": args.backend,
            "status": "error",
            "reason": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(),
        }
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "traceback"}))
    return 0 if result["status"] in ("ok", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
