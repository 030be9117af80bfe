"""scaling_<device>.json, .md and .png: each backend's trainer on 1 device and data-parallel on 2.

Examples/s at 1 and 2 devices, each in a process of its own, the 2-device run on
the framework's own engine (conformance.engines). Simulated CPU devices share the same
cores, so on a CPU the ratio is what the engine costs (all-reduces, a second replica), not a
speed-up; on a machine with several GPUs it is the real scaling.
"""

from __future__ import annotations

from ..reporting import machine_line, pyplot, save_png, versions_line
from .memory_report import one_line, pair_up, shape_tables
from .report import section_record


def files(device) -> tuple[str, ...]:
    return tuple(f"scaling_{device}{suffix}" for suffix in (".json", ".md", ".png"))


def compare(one: dict, two: dict) -> dict:
    return {
        "status": "ok",
        "one": one["examples_per_s"],
        "two": two["examples_per_s"],
        "ratio": two["examples_per_s"] / one["examples_per_s"],
        "bn_semantics": two["bn_semantics"],
        "device": one["device"],
        "arithmetic": one["arithmetic"],
    }


def summarize(rows) -> list[dict]:
    """One entry per shape and backend: examples/s on 1 and 2 devices and their ratio, or why not."""
    return pair_up(rows, 1, 2, compare)


def build(rows, device, shapes, warmup, steps, compile, seconds) -> dict:
    return section_record(rows, device, shapes, warmup, steps, compile, seconds) | {
        "summary": summarize(rows),
    }


def _row(entry) -> str:
    if entry["status"] != "ok":
        return f"| {entry['backend']} | {entry['status']}: {one_line(entry['reason'])} |" + " |" * 4
    return (
        f"| {entry['backend']} | {entry['one']:,.0f} | {entry['two']:,.0f} | {entry['ratio']:.2f}x | "
        f"{entry['bn_semantics']} | {entry['device']}, {entry['arithmetic']} |"
    )


def markdown(result: dict) -> str:
    versions = versions_line(result["frameworks"])
    simulated = result["device"] == "cpu"
    out = [
        "# Scaling: 1 device against 2 (data-parallel, `--devices 2`)",
        "",
        f"- Device: {result['device_words']}" + (", 2 simulated CPU devices on the same cores" if simulated else ""),
        f"- Machine: {machine_line(result['machine'])}",
        f"- Date: {result['date']}; Python {result['machine']['python']}; {result['machine']['os']}",
        f"- Versions: {versions}",
        f"- Each run in a process of its own (torchrun's two for PyTorch): the project's trainer, the same global "
        f"batch, {result['warmup']} warm-up steps, then {result['steps']} measured steps; 2 devices on each "
        f"framework's engine (docs/distributed.md).",
        "- "
        + (
            "On a CPU the simulated devices share the same cores: the ratio is the engine's overhead, not a speed-up."
            if simulated
            else "The ratio is the speed-up of the second GPU."
        ),
        f"- Total time: {result['seconds']:.0f} s.",
        "",
    ]
    head = [
        "| backend | examples/s, 1 device | 2 devices | ratio | BatchNorm on 2 | device |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    return "\n".join(
        out + shape_tables(result, head, _row, f"![examples/s on 1 and 2 devices]({files(result['device'])[2]})")
    )


def plot(result, path) -> None:
    """Examples/s on 1 and 2 devices per backend."""
    import numpy as np

    plt = pyplot()
    entries = [e for e in result["summary"] if e["status"] == "ok"]
    figure, axis = plt.subplots(figsize=(7, 4))
    x = np.arange(len(entries))
    for offset, key, hatch, label in ((-0.2, "one", None, "1 device"), (0.2, "two", "//", "2 devices")):
        axis.bar(x + offset, [e[key] for e in entries], 0.4, hatch=hatch, label=label)
    for i, e in enumerate(entries):
        axis.annotate(f"{e['ratio']:.2f}x", (i + 0.2, e["two"]), ha="center", va="bottom", fontsize=8)
    axis.set_xticks(x, [e["backend"] for e in entries])
    axis.set_ylabel("examples/s (higher is better)")
    axis.legend(fontsize=8)
    names = ", ".join(shape["name"] for shape in result["shapes"])
    figure.suptitle(f"{names} - {result['device_words']} - {result['date']}", fontsize=9)
    save_png(figure, path)
