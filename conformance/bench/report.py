"""bench.json, bench.md and bench.png from the measurements of `densenet-xf bench`."""

from __future__ import annotations

from ..reporting import machine_info, pyplot, run_record, save_png, versions_line

FILES = ("bench.json", "bench.md", "bench.png")
RUN_LABELS = {
    "anchor": "d2l book's code (anchor)",
    "fp32": "trainer fp32 (exact)",
    "tf32": "trainer tf32 (fast default)",
    "bf16": "trainer bf16",
}


def add_ratios(rows) -> dict:
    """Each ok row's speed relative to its framework's anchor and to the fastest anchor,
    per shape; returns {shape: fastest anchor's backend}."""
    fastest = {}
    for shape in dict.fromkeys(row["shape"] for row in rows):
        anchors = {
            row["backend"]: row["examples_per_s"]
            for row in rows
            if row["shape"] == shape and row["run"] == "anchor" and row["status"] == "ok"
        }
        best = max(anchors, key=anchors.get) if anchors else None
        fastest[shape] = best
        for row in rows:
            if row["shape"] != shape or row["status"] != "ok":
                continue
            own = anchors.get(row["backend"])
            row["vs_own_anchor"] = row["examples_per_s"] / own if own else None
            row["vs_fastest_anchor"] = row["examples_per_s"] / anchors[best] if best else None
    return fastest


def device_words(rows, device) -> str:
    """The accelerator's name from the measurements (the CPU's model on a CPU run)."""
    names = sorted({row["device"] for row in rows if row.get("status") == "ok" and not row["device"].startswith("cpu")})
    machine = machine_info()
    cpu = f"{machine['cpu']}, {machine['cores']} cores"
    if device == "gpu" and names:
        return f"GPU: {'; '.join(names)} (host CPU: {cpu})"
    return f"CPU: {cpu}" + (" (no GPU was usable: every backend ran on the CPU)" if device == "gpu" else "")


def build(rows, device, shapes, warmup, steps, compile, seconds) -> dict:
    fastest = add_ratios(rows)
    return {
        **run_record(),
        "device": device,
        "device_words": device_words(rows, device),
        "warmup": warmup,
        "steps": steps,
        "compile": compile,
        "shapes": shapes,
        "fastest_anchor": fastest,
        "rows": rows,
        "seconds": seconds,
    }


def _number(value, digits=0) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}x"


def _cell_row(row) -> str:
    label = RUN_LABELS.get(row["run"], row["run"])
    if row["status"] != "ok":
        reason = row.get("reason", "no result").replace("|", "/").splitlines()[0]
        return f"| {row['backend']} | {label} | {row['status']}: {reason} | | | | | | |"
    where = row["device"] + (f" ({row['device_note']})" if row.get("device_note") else "")
    memory = f"{row['peak_bytes'] / 2**20:,.0f} MiB" + (" (RSS)" if "RSS" in row["peak_kind"] else "")
    return (
        f"| {row['backend']} | {label} | {row['arithmetic']} | {_number(row['examples_per_s'])} | "
        f"{_ratio(row.get('vs_own_anchor'))} | {_ratio(row.get('vs_fastest_anchor'))} | "
        f"{_number(row['first_step_s'], 2)} | {memory} | {where} |"
    )


def markdown(result: dict) -> str:
    versions = versions_line(result["frameworks"])
    out = [
        "# Training speed: the project's trainers against the d2l book's code",
        "",
        f"- Device: {result['device_words']}",
        f"- Date: {result['date']}; Python {result['machine']['python']}; {result['machine']['os']}",
        f"- Versions: {versions}",
        f"- Each row ran in a process of its own, on the same Fashion-MNIST images in the same seeded "
        f"order: {result['warmup']} warm-up step(s) (the first, with any compilation, timed apart), then "
        f"{result['steps']} measured steps. SGD, lr 0.1; trainer compile flag: {result['compile']}.",
        "- Anchor: `bench/anchors/<framework>_d2l.py`, the book's layers and plain training loop "
        "(bugs fixed), reading loss and accuracy on the host every step as the book does. Trainer: the "
        "project's, with the data set on the device and one host read per measured window.",
        "- Peak memory: the framework allocator's peak on a GPU, else the process's peak resident "
        "set size (RSS: includes the framework's own libraries).",
        f"- Total time: {result['seconds']:.0f} s.",
        "- Peak memory and time per step of densenet121, plain and memory-efficient: `memory_cpu.md`, "
        "`memory_gpu.md` (`densenet-xf bench --section memory`).",
        "",
    ]
    for shape in result["shapes"]:
        rows = [row for row in result["rows"] if row["shape"] == shape["name"]]
        fastest = result["fastest_anchor"].get(shape["name"])
        out += [
            f"## {shape['name']} ({shape['examples']:,} training images)",
            "",
            f"| backend | run | arithmetic | examples/s | vs own anchor | vs fastest anchor"
            f"{f' ({fastest})' if fastest else ''} | first step (s) | peak memory | device |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        out += [_cell_row(row) for row in rows] + [""]
    out += ["![examples per second](bench.png)", ""]
    return "\n".join(out)


def plot(result, path) -> None:
    """Examples/s per backend, one bar per run (anchor and precisions), one panel per shape."""
    import numpy as np

    plt = pyplot()
    shapes = result["shapes"]
    runs = list(RUN_LABELS)
    figure, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [row for row in result["rows"] if row["shape"] == shape["name"]]
        backends = list(dict.fromkeys(row["backend"] for row in rows))
        width = 0.8 / len(runs)
        for i, run in enumerate(runs):
            speeds = [
                next(
                    (
                        row["examples_per_s"]
                        for row in rows
                        if row["backend"] == b and row["run"] == run and row["status"] == "ok"
                    ),
                    np.nan,
                )
                for b in backends
            ]
            bars = ax.bar(
                np.arange(len(backends)) + (i - (len(runs) - 1) / 2) * width,
                speeds,
                width,
                label=RUN_LABELS[run],
                hatch="//" if run == "anchor" else None,
            )
            ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:,.0f}" for v in speeds], fontsize=6)
        ax.set_xticks(np.arange(len(backends)), backends)
        ax.set_ylabel("examples/s (higher is better)")
        ax.set_title(shape["name"])
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"{result['device_words']} - {result['date']}", fontsize=9)
    save_png(figure, path)


def files(device) -> tuple[str, ...]:
    return FILES
