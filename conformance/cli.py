"""The `densenet-xf` command line.

Every subcommand takes `--backend` (torch, mxnet, tf, jax; `reference` for the NumPy
oracle where that makes sense) and imports only that backend's framework.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
import warnings

import numpy as np

from . import accuracy, backends, engines, export, interface, specs, training, trajectory, zoo
from .bench import harness
from .data import DataError
from .interface import BackendUnavailable
from .reference import gradient_check
from .specs import InputError, SpecError
from .suite import checks, runner
from .training import TrainingError
from .weights import CheckpointError

FD_TOLERANCE = 1e-3  # finite differences vs. the reference's backward (see reference.gradient_check)


def argument_type(parse):
    """An argparse type from `parse`: its ValueError (SpecError too) becomes argparse's error."""

    def convert(text):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = parse.__name__.strip("_")
    return convert


def _backend_name(name: str) -> str:
    backends.check_backend_name(name)
    return name


def _backend_list(text: str) -> list[str] | None:
    """--backends: comma-separated framework backends (the reference is not one)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        backends.check_backend_name(name, with_reference=False)
    return names or None


def _device(name: str) -> str:
    name = "gpu" if name == "cuda" else name
    interface.check_device(name)
    return name


arch_type = argument_type(specs.get_spec)
backend_type = argument_type(_backend_name)
backend_list_type = argument_type(_backend_list)
device_type = argument_type(_device)


def _at_least(kind, minimum, *, strict: bool):
    """An argparse type: `kind` above `minimum` (or at least it, when not `strict`)."""
    words = f"{'a positive' if strict else 'a non-negative'} {'integer' if kind is int else 'number'}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {words}") from None
        if value < minimum or (strict and value == minimum) or value != value:
            raise argparse.ArgumentTypeError(f"{text} is not {words}")
        return value

    parse.__name__ = words
    return parse


positive_int = _at_least(int, 0, strict=True)
non_negative_int = _at_least(int, 0, strict=False)
positive_float = _at_least(float, 0.0, strict=True)
non_negative_float = _at_least(float, 0.0, strict=False)


def to_json(payload) -> str:
    """Indented JSON with short lists (shapes) kept on one line."""
    text = json.dumps(payload, indent=2)
    return re.sub(
        r"\[\s*([^\[\]{}]*?)\s*\]",
        lambda m: "[" + ", ".join(p.strip() for p in m.group(1).split(",")) + "]" if m.group(1).strip() else "[]",
        text,
    )


def add_model_args(parser, size=False):
    parser.add_argument("--backend", type=backend_type, required=True, help=", ".join(backends.backend_names(True)))
    parser.add_argument("--arch", type=arch_type, required=True, help=", ".join(specs.ARCHS))
    parser.add_argument("--device", type=device_type, default="cpu", help="cpu (default) or gpu/cuda")
    if size:
        parser.add_argument("--size", type=positive_int, required=True, help="input height and width")
        parser.add_argument("--batch", type=positive_int, default=2)


def cmd_params(args):
    backend = backends.load_backend(args.backend, args.device)
    model = backend.build(args.arch)
    trainable, non_trainable = backend.count_params(model)
    expected = specs.count_params(args.arch)
    print(f"backend: {backend.name}  arch: {args.arch.name}")
    print(f"trainable: {trainable:,}  non-trainable (BatchNorm running statistics): {non_trainable:,}")
    print(
        f"spec: {expected[0]:,} trainable, {expected[1]:,} non-trainable"
        + ("" if (trainable, non_trainable) == expected else "  <-- MISMATCH")
    )
    print(trainable)
    return 0 if (trainable, non_trainable) == expected else 1


def cmd_shapes(args):
    backend = backends.load_backend(args.backend, args.device)
    expected = specs.stage_shapes(args.arch, args.size, args.batch, backend.layout)
    x = specs.to_layout(np.zeros((args.batch, args.arch.in_channels, args.size, args.size), np.float32), backend.layout)
    model = backend.build(args.arch)
    shapes = backend.stage_shapes(model, x)
    matches = {stage: tuple(shape) for stage, shape in shapes.items()} == dict(expected)
    print(
        to_json(
            {
                "backend": backend.name,
                "arch": args.arch.name,
                "layout": backend.layout,
                "input": list(x.shape),
                "stages": {k: list(v) for k, v in shapes.items()},
                "matches_spec": matches,
            }
        )
    )
    return 0 if matches else 1


def cmd_check(args):
    if args.backend == backends.REFERENCE:  # the oracle is checked against finite differences
        worst, where = gradient_check(args.arch, args.size, args.batch, args.seed)
        print(
            to_json(
                {
                    "backend": "reference",
                    "arch": args.arch.name,
                    "size": args.size,
                    "finite_differences": checks.measurement(worst, FD_TOLERANCE, worst_at=where),
                }
            )
        )
        return 0 if worst <= FD_TOLERANCE else 1
    backend = backends.load_backend(args.backend, args.device)
    dtypes = checks.DTYPES if args.dtype == "both" else (args.dtype,)
    results = checks.compare_with_reference(backend, args.arch, args.size, args.batch, args.seed, dtypes)
    print(
        to_json(
            {
                "backend": backend.name,
                "device": backend.device_name,
                "arch": args.arch.name,
                "size": args.size,
                "batch": args.batch,
                "seed": args.seed,
                "results": results,
                "passed": checks.all_passed(results),
            }
        )
    )
    return 0 if checks.all_passed(results) else 1


def cmd_train(args):
    recipe = training.get_recipe(args.recipe).replace(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        size=args.size,
        train_examples=args.train_examples,
        test_examples=args.test_examples,
        seed=args.seed,
    )
    cluster = engines.make_cluster(args.nodes, args.node_rank, args.coordinator, args.devices, args.workers)
    devices = cluster.world  # replicas over all nodes
    training.check_devices(recipe, devices, args.sync_bn)
    if devices > 1 and args.backend in engines.ENGINES:  # refused here, once, before any launch
        engines.check_semantics(
            engines.ENGINES[args.backend].bn_semantics,
            "gpu" if args.device in ("gpu", "cuda") else "cpu",
            args.sync_bn,
            args.backend,
        )
    if devices > 1 and not engines.launched():  # simulated devices need a fresh process
        engines.check_cluster(args.backend, cluster)
        return engines.launch(args.backend, args.devices, ["-m", "conformance", *args.argv], cluster=cluster)
    if devices > 1:
        backend, _ = engines.prepare(args.backend, devices, args.device, cluster)
    else:
        backend = backends.load_backend(args.backend, args.device)
    if backend.device_note:
        print(f"note: {backend.device_note}", file=sys.stderr)
    out = args.out = args.out or f"build/train/{backend.name}-{args.arch.name}-{recipe.name}"
    record = training.train(
        backend,
        args.arch,
        recipe,
        out,
        args.data_dir,
        args.resume,
        progress=not args.quiet,
        precision=args.precision,
        compile=args.compile,
        devices=devices,
        sync_bn=args.sync_bn,
        on_step=engines.kill_hook(),
    )
    last = record["epochs"][-1] if record["epochs"] else {}
    if engines.process_index() == 0:
        print(
            to_json(
                {
                    "out": str(out),
                    "backend": backend.name,
                    "device": backend.device_name,
                    "epochs": len(record["epochs"]),
                    "test_acc": last.get("test_acc"),
                    "examples_per_s": last.get("examples_per_s"),
                    "arithmetic": record["arithmetic"],
                    "devices": record["devices"],
                    "bn_semantics": record["bn_semantics"],
                }
            )
        )
    return 0


def cmd_evaluate(args):
    backend = backends.load_backend(args.backend, args.device)
    result = training.evaluate_checkpoint(
        backend, args.checkpoint, args.size, args.data_dir, args.batch_size, args.test_examples
    )
    print(to_json(result))
    return 0


def cmd_seed_spread(args):
    backend = backends.load_backend(args.backend, args.device)
    recipe = training.get_recipe(args.recipe)
    out = args.out or f"build/seed-spread/{backend.name}-{recipe.name}"
    summary = training.seed_spread(backend, args.arch, recipe, args.seeds, out, args.data_dir, args.progress)
    print(to_json({k: v for k, v in summary.items() if k != "recipe"}))
    return 0


@contextlib.contextmanager
def framework_logs_silenced(verbose: bool):
    """The frameworks' own chatter while a command runs (TensorFlow's C++ log lines, which it writes
    to the process's stderr whatever Python does, torch's exporter warnings, Python warnings) goes to
    a discarded file, unless `verbose`; our own messages come after, on the real stderr."""
    if verbose:
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # read when TensorFlow loads
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            logging.disable(logging.NOTSET)


def cmd_trajectory(args):
    result = trajectory.run(
        args.backends or backends.backend_names(),
        args.setup,
        args.out,
        args.reference_steps,
        args.data_dir,
        args.publish,
        args.runs.split(",") if args.runs else None,
    )
    for label, run in result["runs"].items():
        worst = max(trajectory.worst(run, name) for name in run["backends"])
        print(
            f"trajectory {label}: backends within {worst:.1e} of each other; "
            f"{run['predictions_differing']} of {run['test_images']} test predictions differ"
        )
    print(f"report: {args.out}/trajectory.md (and .json, .png)")
    return 0


def cmd_accuracy(args):
    result = accuracy.run(
        args.backends or backends.backend_names(),
        args.recipe,
        args.seeds,
        args.out,
        args.arch.name,
        args.device,
        args.data_dir,
        args.publish,
    )
    print(f"accuracy: {accuracy.verdict(result)}")
    print(f"report: {args.out}/{accuracy.files(args.device)[1]} (and .json, .png)")
    return 0


def cmd_convert(args):
    with framework_logs_silenced(args.verbose):
        spec, notes = zoo.convert(args.src, args.dst, args.arch, args.src_format, args.dst_format)
    print(
        to_json(
            {
                "src": args.src,
                "from": zoo.detect_format(args.src, args.src_format),
                "dst": args.dst,
                "to": zoo.detect_format(args.dst, args.dst_format),
                "arch": spec.name,
                "notes": notes,
                "spec": json.loads(spec.to_json()),
            }
        )
    )
    return 0


def cmd_export(args):
    with framework_logs_silenced(args.verbose):
        backend = backends.load_backend(args.backend)
        result = export.export_checkpoint(backend, args.checkpoint, args.format, args.out, args.size)
    print(to_json(result))
    return 0


def cmd_conformance(args):
    recipe = None if args.recipe is None else ("" if args.recipe == "none" else training.get_recipe(args.recipe).name)
    return runner.run(
        args.out,
        args.device,
        args.backends,
        args.matrix,
        recipe,
        args.data_dir,
        args.require_all,
        args.publish,
        jobs=args.jobs,
        data_parallel=not args.no_data_parallel,
    )


def cmd_bench(args):
    shapes = harness.shapes_for(args.device, args.arch, args.size, args.batch, args.examples)
    memory_shapes = harness.shapes_for(
        args.device, args.arch, args.size, args.batch, args.examples, harness.MEMORY_SHAPES
    )
    sections = harness.SECTIONS if args.section == "all" else (args.section,)
    return harness.run(
        args.out,
        args.device,
        args.backends,
        args.warmup,
        args.steps,
        args.quick,
        shapes,
        args.compile,
        args.data_dir,
        args.publish,
        progress=not args.quiet,
        sections=sections,
        memory_shapes=memory_shapes,
        repeats=args.repeats,
    )


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
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64", "both"), default="both")
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("train", help="train on Fashion-MNIST with a recipe (quick, d2l); resumable")
    p.add_argument("--backend", type=backend_type, required=True)
    p.add_argument("--arch", type=arch_type, default=specs.get_spec("d2l"), help="default d2l")
    p.add_argument("--recipe", default="quick", help="quick (minutes on a CPU) or d2l (the book's: 10 epochs at 96x96)")
    p.add_argument("--device", type=device_type, default="cpu")
    for flag, kind in (
        ("--epochs", positive_int),
        ("--batch-size", positive_int),
        ("--lr", positive_float),
        ("--momentum", non_negative_float),
        ("--size", positive_int),
        ("--train-examples", positive_int),
        ("--test-examples", positive_int),
        ("--seed", non_negative_int),
    ):
        p.add_argument(flag, type=kind, help="override the recipe's value")
    p.add_argument("--data-dir", help="directory with the Fashion-MNIST .gz files")
    p.add_argument("--out", help="run directory (default build/train/BACKEND-ARCH-RECIPE)")
    p.add_argument("--resume", action="store_true", help="continue after the last completed epoch in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--precision",
        choices=interface.PRECISIONS,
        default="fp32",
        help="fp32: exact float32 (default); tf32: the framework's fast float32 defaults (TF32 on "
        "GPUs that have it); bf16: mixed precision, bfloat16 compute with float32 weights",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the model (torch.compile; the other backends always compile their steps)",
    )
    p.add_argument(
        "--devices",
        type=positive_int,
        default=1,
        help="data-parallel over N devices (per node with --nodes; CPU devices are simulated; docs/distributed.md)",
    )
    p.add_argument(
        "--nodes",
        type=positive_int,
        default=1,
        help="data-parallel over N nodes (machines, or processes on one), each with --devices devices; "
        "run the same command on every node with its --node-rank",
    )
    p.add_argument("--node-rank", type=non_negative_int, default=0, help="this node's rank, 0 to N-1 (with --nodes)")
    p.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="with --nodes: node 0's address and a free port on it, the same on every node",
    )
    p.add_argument(
        "--workers",
        metavar="HOST0:PORT0,HOST1:PORT1,...",
        help="with --nodes, for engines whose every node listens (TensorFlow): each node's address and "
        "a free port, node 0's first (default: the coordinator's host, its port + the node's rank)",
    )
    p.add_argument(
        "--sync-bn",
        action="store_true",
        help="with --devices: BatchNorm on the global batch's "
        "statistics (default: each device's shard's), where the framework can",
    )
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("evaluate", help="test accuracy of a canonical checkpoint in any backend")
    p.add_argument("--backend", type=backend_type, required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--device", type=device_type, default="cpu")
    p.add_argument("--size", type=positive_int, help="input size (default: the one recorded in the checkpoint)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--test-examples", type=positive_int, help="evaluate on the first N test images")
    p.add_argument("--data-dir")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("seed-spread", help="train a recipe with seeds 0..N-1: how much accuracy scatters")
    p.add_argument("--backend", type=backend_type, required=True)
    p.add_argument("--arch", type=arch_type, default=specs.get_spec("d2l"))
    p.add_argument("--recipe", default="quick")
    p.add_argument("--seeds", type=positive_int, default=10)
    p.add_argument("--device", type=device_type, default="cpu")
    p.add_argument("--data-dir")
    p.add_argument("--out", help="default build/seed-spread/BACKEND-RECIPE")
    p.add_argument("--progress", action="store_true", help="a progress bar over the seeds")
    p.set_defaults(run=cmd_seed_spread)

    p = sub.add_parser(
        "trajectory",
        help="train every backend step by step from the same weights in float64 and float32; compare the weights",
    )
    p.add_argument("--backends", type=backend_list_type, help="comma-separated (default: all)")
    p.add_argument("--setup", default="quick", help="quick (the d2l net, 94 steps) or conformance (tiny, 24 steps)")
    p.add_argument(
        "--reference-steps", type=non_negative_int, help="steps the NumPy reference follows (default: the setup's)"
    )
    p.add_argument("--data-dir")
    p.add_argument(
        "--runs",
        help="comma-separated, of float64-momentum-0, float64-momentum-0.875, float32-... (default: all four); "
        "runs already in --out are kept",
    )
    p.add_argument("--out", default="build/trajectory")
    p.add_argument("--publish", help="also copy trajectory.md/json/png to this directory (docs/results)")
    p.set_defaults(run=cmd_trajectory)

    p = sub.add_parser(
        "accuracy",
        help="train S seeds per backend: do the float32 test accuracies differ by more than seed noise?",
    )
    p.add_argument("--backends", type=backend_list_type, help="comma-separated (default: all)")
    p.add_argument("--arch", type=arch_type, default=specs.get_spec("d2l"))
    p.add_argument("--recipe", default="quick")
    p.add_argument("--seeds", type=positive_int, default=10, help="seeds per backend, at least 2 (default 10)")
    p.add_argument("--device", type=device_type, default="cpu")
    p.add_argument("--data-dir")
    p.add_argument("--out", default="build/accuracy", help="run directories and accuracy_DEVICE.md/json/png")
    p.add_argument("--publish", help="also copy accuracy_DEVICE.md/json/png to this directory (docs/results)")
    p.set_defaults(run=cmd_accuracy)

    p = sub.add_parser(
        "convert",
        help="convert weights between model zoos: .safetensors, .pth/.pt (torchvision), "
        ".h5 / .weights.h5 (Keras applications), .params (Gluon)",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument(
        "--arch", type=arch_type, help="check that SRC holds this architecture (it is inferred from the tensors)"
    )
    p.add_argument(
        "--from",
        dest="src_format",
        help="SRC's format, overriding its suffix: canonical, torchvision, keras-h5, keras, gluon",
    )
    p.add_argument("--to", dest="dst_format", help="DST's format, overriding its suffix")
    p.add_argument("--verbose", action="store_true", help="show the frameworks' own log lines and warnings")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("export", help="write a checkpoint as ONNX or in the framework's own format")
    p.add_argument("--backend", type=backend_type, required=True, help=", ".join(backends.backend_names()))
    p.add_argument(
        "--format",
        choices=("onnx", "native"),
        default="onnx",
        help="onnx, or native: .keras (tf), torch.export .pt2, jax.export bytes, MXNet symbol + params",
    )
    p.add_argument("--size", type=positive_int, help="input size traced (default: the one recorded in the checkpoint)")
    p.add_argument("checkpoint", help="a canonical .safetensors checkpoint")
    p.add_argument("out", help="output file (for MXNet native: a prefix for PREFIX-symbol.json, PREFIX-0000.params)")
    p.add_argument("--verbose", action="store_true", help="show the frameworks' own log lines and warnings")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("conformance", help="every backend in its own process against the reference; writes a report")
    p.add_argument("--device", type=device_type, default="cpu")
    p.add_argument("--backends", type=backend_list_type, help="comma-separated (default: all)")
    p.add_argument("--matrix", choices=("default", "tiny"), default="default")
    p.add_argument(
        "--recipe",
        help="training recipe for the accuracy check: quick, d2l or none (default: quick on the CPU, d2l on a GPU)",
    )
    p.add_argument("--data-dir")
    p.add_argument("--out", default="build/conformance")
    p.add_argument("--require-all", action="store_true", help="a skipped (not installed) backend fails the run")
    p.add_argument("--publish", help="also copy the report and plots to this directory (docs/results)")
    p.add_argument(
        "--jobs",
        type=positive_int,
        help="backend worker processes at a time (default: 2 on the CPU, one compiling while another "
        "computes; 1 on a GPU, whose memory each framework takes most of)",
    )
    p.add_argument(
        "--no-data-parallel",
        action="store_true",
        help="leave out the data-parallel check (it needs 2 devices: a machine with one GPU has 1)",
    )
    p.set_defaults(run=cmd_conformance)

    p = sub.add_parser(
        "bench", help="time every backend's trainer against the d2l book's code; writes bench.md/json/png"
    )
    p.add_argument("--device", type=device_type, default="cpu")
    p.add_argument("--backends", type=backend_list_type, help="comma-separated (default: all)")
    p.add_argument("--out", default="build/bench")
    p.add_argument("--steps", type=positive_int, help="measured steps (default 30 on a CPU, 200 on a GPU)")
    p.add_argument(
        "--warmup", type=positive_int, help="warm-up steps, the first timed apart (default 5 on a CPU, 20 on a GPU)"
    )
    p.add_argument("--quick", action="store_true", help="2 warm-up and 5 measured steps: checks the pipeline")
    for flag, kind in (
        ("--arch", str),
        ("--size", positive_int),
        ("--batch", positive_int),
        ("--examples", positive_int),
    ):
        p.add_argument(flag, type=kind, help="measure one shape instead of the device's (tests use a tiny net)")
    p.add_argument("--compile", action="store_true", help="the trainers' compile flag (torch.compile, XLA for TF)")
    p.add_argument("--data-dir")
    p.add_argument("--publish", help="also copy bench.md/json/png to this directory (docs/results)")
    p.add_argument(
        "--repeats",
        type=positive_int,
        help=f"speed section: each measurement N times, round-robin (default {harness.REPEATS}; 1 with --quick)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--section",
        choices=("all", "speed", "memory", "scaling"),
        default="all",
        help="speed: trainers against the d2l code (bench.md); memory: densenet121 plain against "
        "memory-efficient (memory_<device>.md); scaling: 1 device against 2, data-parallel "
        "(scaling_<device>.md); default all three",
    )
    p.set_defaults(run=cmd_bench)
    return parser


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised where the program is, as SIGINT raises KeyboardInterrupt."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def stop_message(args, signum) -> str:
    """What an interrupted command tells the user: which signal, and how to go on."""
    message = f"densenet-xf {args.command}: stopped by {signal.Signals(signum).name}"
    if args.command == "train" and getattr(args, "out", None):
        message += f"; every completed epoch is saved in {args.out}: run the same command with --resume to continue"
    return message


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # what a launched process runs again
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        return args.run(args)
    except (
        SpecError,
        InputError,
        CheckpointError,
        BackendUnavailable,
        ValueError,
        DataError,
        TrainingError,
        engines.PeerLost,
        OSError,
    ) as error:
        message = re.sub(r"\x1b\[[0-9;?]*[ -/]*[@-~]", "", str(error))  # no terminal escape codes
        print(f"densenet-xf {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        print(f"\n{stop_message(args, signum)}", file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
