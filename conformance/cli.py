"""The `densenet-xf` command line.

Every subcommand takes `--backend` (torch, mxnet, tf, jax; `reference` for the NumPy
oracle where that makes sense) and imports only that backend's framework.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import numpy as np

from . import backends, checks, specs, training
from .backends import BackendUnavailable
from .data import DataError
from .reference import gradient_check
from .specs import InputError, SpecError
from .training import TrainingError
from .weights import CheckpointError

FD_TOLERANCE = 1e-3  # finite differences vs. the reference's backward (see reference.gradient_check)


def _arch(name):
    try:
        return specs.get_spec(name)
    except SpecError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _backend_name(name):
    try:
        backends.check_backend_name(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def _device(name):
    name = "gpu" if name == "cuda" else name
    try:
        backends.check_device(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def to_json(payload) -> str:
    """Indented JSON with short lists (shapes) kept on one line."""
    text = json.dumps(payload, indent=2)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + ", ".join(p.strip() for p in m.group(1).split(",")) + "]"
                  if m.group(1).strip() else "[]", text)


def add_model_args(parser, size=False):
    parser.add_argument("--backend", type=_backend_name, required=True, help=", ".join(backends.backend_names(True)))
    parser.add_argument("--arch", type=_arch, required=True, help=", ".join(specs.ARCHS))
    parser.add_argument("--device", type=_device, default="cpu", help="cpu (default) or gpu/cuda")
    if size:
        parser.add_argument("--size", type=int, required=True, help="input height and width")
        parser.add_argument("--batch", type=int, default=2)


def cmd_params(args):
    backend = backends.load_backend(args.backend, args.device)
    model = backend.build(args.arch)
    trainable, non_trainable = backend.count_params(model)
    expected = specs.count_params(args.arch)
    print(f"backend: {backend.name}  arch: {args.arch.name}")
    print(f"trainable: {trainable:,}  non-trainable (BatchNorm running statistics): {non_trainable:,}")
    print(f"spec: {expected[0]:,} trainable, {expected[1]:,} non-trainable"
          + ("" if (trainable, non_trainable) == expected else "  <-- MISMATCH"))
    print(trainable)
    return 0 if (trainable, non_trainable) == expected else 1


def cmd_shapes(args):
    backend = backends.load_backend(args.backend, args.device)
    expected = specs.stage_shapes(args.arch, args.size, args.batch, backend.layout)
    x = specs.to_layout(np.zeros((args.batch, args.arch.in_channels, args.size, args.size), np.float32), backend.layout)
    model = backend.build(args.arch)
    shapes = backend.stage_shapes(model, x)
    matches = {stage: tuple(shape) for stage, shape in shapes.items()} == dict(expected)
    print(to_json({"backend": backend.name, "arch": args.arch.name, "layout": backend.layout,
                      "input": list(x.shape), "stages": {k: list(v) for k, v in shapes.items()},
                      "matches_spec": matches}))
    return 0 if matches else 1


def cmd_check(args):
    if args.backend == backends.REFERENCE:  # the oracle is checked against finite differences
        worst, where = gradient_check(args.arch, args.size, args.batch, args.seed)
        print(to_json({"backend": "reference", "arch": args.arch.name, "size": args.size,
                          "finite_differences": checks.measurement(worst, FD_TOLERANCE, worst_at=where)}))
        return 0 if worst <= FD_TOLERANCE else 1
    backend = backends.load_backend(args.backend, args.device)
    dtypes = checks.DTYPES if args.dtype == "both" else (args.dtype,)
    results = checks.compare_with_reference(backend, args.arch, args.size, args.batch, args.seed, dtypes)
    print(to_json({"backend": backend.name, "device": backend.device_name, "arch": args.arch.name,
                      "size": args.size, "batch": args.batch, "seed": args.seed, "results": results,
                      "passed": checks.all_passed(results)}))
    return 0 if checks.all_passed(results) else 1


def cmd_train(args):
    recipe = training.get_recipe(args.recipe).replace(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, size=args.size,
        train_examples=args.train_examples, test_examples=args.test_examples, seed=args.seed)
    backend = backends.load_backend(args.backend, args.device)
    if backend.device_note:
        print(f"note: {backend.device_note}", file=sys.stderr)
    out = args.out or f"build/train/{backend.name}-{args.arch.name}-{recipe.name}"
    record = training.train(backend, args.arch, recipe, out, args.data_dir, args.resume, progress=not args.quiet)
    last = record["epochs"][-1] if record["epochs"] else {}
    print(to_json({"out": str(out), "backend": backend.name, "device": backend.device_name,
                   "epochs": len(record["epochs"]), "test_acc": last.get("test_acc"),
                   "examples_per_s": last.get("examples_per_s")}))
    return 0


def cmd_evaluate(args):
    backend = backends.load_backend(args.backend, args.device)
    result = training.evaluate_checkpoint(backend, args.checkpoint, args.size, args.data_dir,
                                          args.batch_size, args.test_examples)
    print(to_json(result))
    return 0


def cmd_seed_spread(args):
    backend = backends.load_backend(args.backend, args.device)
    recipe = training.get_recipe(args.recipe)
    out = args.out or f"build/seed-spread/{backend.name}-{recipe.name}"
    summary = training.seed_spread(backend, args.arch, recipe, args.seeds, out, args.data_dir)
    print(to_json({k: v for k, v in summary.items() if k != "recipe"}))
    return 0


def cmd_conformance(args):
    from . import runner

    names = args.backends.split(",") if args.backends else None
    for name in names or []:
        backends.check_backend_name(name, with_reference=False)
    recipe = None if args.recipe is None else ("" if args.recipe == "none" else training.get_recipe(args.recipe).name)
    return runner.run(args.out, args.device, names, args.matrix, recipe, args.data_dir, args.require_all, args.publish)


def build_parser():
    parser = argparse.ArgumentParser(prog="densenet-xf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="print the trainable parameter count (last line)")
    add_model_args(p)
    p.set_defaults(run=cmd_params)

    p = sub.add_parser("shapes", help="print every stage's output shape as JSON")
    add_model_args(p, size=True)
    p.set_defaults(run=cmd_shapes)

    p = sub.add_parser("check", help="compare a backend with the NumPy reference; non-zero exit on failure")
    add_model_args(p, size=True)
    p.set_defaults(batch=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64", "both"), default="both")
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("train", help="train on Fashion-MNIST with a recipe (quick, d2l); resumable")
    p.add_argument("--backend", type=_backend_name, required=True)
    p.add_argument("--arch", type=_arch, default=specs.get_spec("d2l"), help="default d2l")
    p.add_argument("--recipe", default="quick", help="quick (minutes on a CPU) or d2l (the book's: 10 epochs at 96x96)")
    p.add_argument("--device", type=_device, default="cpu")
    for flag, kind in (("--epochs", int), ("--batch-size", int), ("--lr", float), ("--momentum", float),
                       ("--size", int), ("--train-examples", int), ("--test-examples", int), ("--seed", int)):
        p.add_argument(flag, type=kind, help="override the recipe's value")
    p.add_argument("--data-dir", help="directory with the Fashion-MNIST .gz files")
    p.add_argument("--out", help="run directory (default build/train/BACKEND-ARCH-RECIPE)")
    p.add_argument("--resume", action="store_true", help="continue after the last completed epoch in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("evaluate", help="test accuracy of a canonical checkpoint in any backend")
    p.add_argument("--backend", type=_backend_name, required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--size", type=int, help="input size (default: the one recorded in the checkpoint)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--test-examples", type=int, help="evaluate on the first N test images")
    p.add_argument("--data-dir")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("seed-spread", help="train a recipe with seeds 0..N-1: how much accuracy scatters")
    p.add_argument("--backend", type=_backend_name, required=True)
    p.add_argument("--arch", type=_arch, default=specs.get_spec("d2l"))
    p.add_argument("--recipe", default="quick")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--data-dir")
    p.add_argument("--out", help="default build/seed-spread/BACKEND-RECIPE")
    p.set_defaults(run=cmd_seed_spread)

    p = sub.add_parser("conformance", help="every backend in its own process against the reference; writes a report")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--backends", help="comma-separated (default: all)")
    p.add_argument("--matrix", choices=("default", "tiny"), default="default")
    p.add_argument("--recipe", help="training recipe for the accuracy check: quick, d2l or none "
                                    "(default: quick on the CPU, d2l on a GPU)")
    p.add_argument("--data-dir")
    p.add_argument("--out", default="build/conformance")
    p.add_argument("--require-all", action="store_true", help="a skipped (not installed) backend fails the run")
    p.add_argument("--publish", help="also copy the report and plots to this directory (docs/results)")
    p.set_defaults(run=cmd_conformance)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (SpecError, InputError, CheckpointError, BackendUnavailable, ValueError, DataError, TrainingError) as error:
        print(f"densenet-xf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
