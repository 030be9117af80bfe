"""bench.json, bench.md and bench.png from the measurements of `densenet-xf bench`."""

from __future__ import annotations

import numpy as np

from ..reporting import machine_info, machine_line, pyplot, run_record, save_png, versions_line

# A measurement during which other processes took more than this share of the machine's
# core-seconds is contended: flagged, run again, and left out of the medians.
CONTENTION = 0.10

FILES = ("bench.json", "bench.md", "bench.png")
RUN_LABELS = {
    "anchor": "d2l book's loop (anchor)",
    "anchor_compiled": "book model, compiled step",
    "fp32": "trainer fp32 (exact)",
    "tf32": "trainer tf32 (fast default)",
    "bf16": "trainer bf16",
}


def measured(rows, shape, backend, run) -> list[dict]:
    """The ok, uncontended measurements of one row of the table."""
    return [
        r
        for r in rows
        if (r["shape"], r["backend"], r["run"]) == (shape, backend, run)
        and r["status"] == "ok"
        and not r.get("contended")
    ]


def spread(values) -> dict:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)), "n": len(values)}


def ratio(ours: dict, theirs: dict) -> dict:
    """Median over median, with the range that the repeats allow (our slowest over their
    fastest to our fastest over their slowest), and what it says: a range that includes 1.0
    is within the noise."""
    low, high = ours["min"] / theirs["max"], ours["max"] / theirs["min"]
    verdict = "faster" if low > 1 else "slower" if high < 1 else "within noise"
    return {"median": ours["median"] / theirs["median"], "min": low, "max": high, "verdict": verdict}


def summarize(rows, device) -> list[dict]:
    """One entry per shape, backend and run: examples/s and first step as median and range
    over the repeats, memory, and the ratio to the framework's own anchor (on a GPU the tf32
    row is the one a user of the frameworks' defaults compares) and to the fastest anchor."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        keys = dict.fromkeys((r["backend"], r["run"]) for r in rows if r["shape"] == shape)
        speeds = {
            key: spread([r["examples_per_s"] for r in found]) for key in keys if (found := measured(rows, shape, *key))
        }
        anchors = {backend: speeds[(backend, "anchor")] for backend, _ in keys if (backend, "anchor") in speeds}
        fastest = max(anchors, key=lambda b: anchors[b]["median"]) if anchors else None
        for backend, run in keys:
            found = measured(rows, shape, backend, run)
            entry = {"shape": shape, "backend": backend, "run": run}
            if not found:
                last = [r for r in rows if (r["shape"], r["backend"], r["run"]) == (shape, backend, run)][-1]
                out.append(entry | {"status": last["status"], "reason": last.get("reason", "no result")})
                continue
            speed = speeds[(backend, run)]
            entry |= {
                "status": "ok",
                "examples_per_s": speed,
                "first_step_s": spread([r["first_step_s"] for r in found]),
                "added_bytes": spread([r["added_bytes"] for r in found])
                if found[0].get("added_bytes") is not None
                else None,
                "peak_bytes": max(r["peak_bytes"] or 0 for r in found),
                "peak_kind": found[0]["peak_kind"],
                "data_bytes": found[0].get("data_bytes", 0),
                "arithmetic": found[0]["arithmetic"],
                "device": found[0]["device"],
                "device_note": found[0].get("device_note", ""),
                "contended": sum(
                    1
                    for r in rows
                    if (r["shape"], r["backend"], r["run"]) == (shape, backend, run) and r.get("contended")
                ),
                "other_share": max(r.get("other_share", 0.0) for r in found),
                "vs_own_anchor": ratio(speed, anchors[backend]) if backend in anchors and run != "anchor" else None,
                "vs_fastest_anchor": ratio(speed, anchors[fastest]) if fastest else None,
                "fastest_anchor": fastest,
            }
            out.append(entry)
    return out


def device_words(rows, device) -> str:
    """The accelerator's name from the measurements (the CPU's model on a CPU run)."""
    names = sorted({row["device"] for row in rows if row.get("status") == "ok" and not row["device"].startswith("cpu")})
    machine = machine_info()
    cpu = f"{machine['cpu']}, {machine['cores']} cores"
    if device == "gpu" and names:
        return f"GPU: {'; '.join(names)} (host CPU: {cpu})"
    return f"CPU: {cpu}" + (" (no GPU was usable: every backend ran on the CPU)" if device == "gpu" else "")


def section_record(rows, device, shapes, warmup, steps, compile, seconds) -> dict:
    """What every bench section's result starts with: when and where it was measured, how, and
    every measurement."""
    return {
        **run_record(),
        "device": device,
        "device_words": device_words(rows, device),
        "warmup": warmup,
        "steps": steps,
        "compile": compile,
        "shapes": shapes,
        "rows": rows,
        "seconds": seconds,
    }


def build(rows, device, shapes, warmup, steps, compile, seconds) -> dict:
    return section_record(rows, device, shapes, warmup, steps, compile, seconds) | {
        "repeats": max((r.get("repeat", 0) for r in rows if "rerun_of" not in r), default=0) + 1,
        "contention_limit": CONTENTION,
        "summary": summarize(rows, device),
    }


def _number(value, digits=0) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _ratio(value) -> str:
    if value is None:
        return ""
    return f"{value['median']:.2f}x ({value['min']:.2f}-{value['max']:.2f}, {value['verdict']})"


def _speed(value) -> str:
    if value["n"] == 1:
        return _number(value["median"])
    return f"{_number(value['median'])} ({_number(value['min'])}-{_number(value['max'])})"


def _mib(value) -> str:
    return "" if value is None else f"{value / 2**20:,.0f} MiB"


def _cell_row(entry) -> str:
    label = RUN_LABELS.get(entry["run"], entry["run"])
    if entry["status"] != "ok":
        reason = entry.get("reason", "no result").replace("|", "/").splitlines()[0]
        return f"| {entry['backend']} | {label} | {entry['status']}: {reason} | | | | | | | |"
    where = entry["device"] + (f" ({entry['device_note']})" if entry.get("device_note") else "")
    added = entry["added_bytes"]
    memory = _mib(None if added is None else added["median"])
    data = f" + data set {_mib(entry['data_bytes'])}" if entry["data_bytes"] else ""
    flagged = f" ({entry['contended']} contended, rerun)" if entry["contended"] else ""
    return (
        f"| {entry['backend']} | {label} | {entry['arithmetic']} | {_speed(entry['examples_per_s'])}{flagged} | "
        f"{_ratio(entry['vs_own_anchor'])} | {_ratio(entry['vs_fastest_anchor'])} | "
        f"{_number(entry['first_step_s']['median'], 2)} | {memory}{data} | {_mib(entry['peak_bytes'])} | {where} |"
    )


def verdicts(result: dict) -> list[str]:
    """Which trainer beats its own anchor beyond the noise, and which does not, in words."""
    out = []
    for entry in result["summary"]:
        mine = entry.get("vs_own_anchor")
        if entry["status"] == "ok" and mine and entry["run"] != "anchor_compiled":
            words = {"faster": "beats", "slower": "is slower than", "within noise": "is within the noise of"}
            out.append(
                f"- {entry['backend']} {RUN_LABELS[entry['run']]} {words[mine['verdict']]} the book's loop "
                f"({mine['median']:.2f}x, range {mine['min']:.2f}-{mine['max']:.2f}; {entry['shape']})"
            )
    return out


def markdown(result: dict) -> str:
    versions = versions_line(result["frameworks"])
    out = [
        "# Training speed: the project's trainers against the d2l book's code",
        "",
        f"- Device: {result['device_words']}",
        f"- Machine: {machine_line(result['machine'])}",
        f"- Date: {result['date']}; Python {result['machine']['python']}; {result['machine']['os']}",
        f"- Versions: {versions}",
        f"- Each measurement ran in a process of its own with empty compilation caches, on the same "
        f"Fashion-MNIST images in the same seeded order: {result['warmup']} warm-up step(s) (the first, "
        f"with any compilation, timed apart), then {result['steps']} measured steps; every row "
        f"{result['repeats']} time(s), round-robin. Examples/s: median (min-max). SGD, lr 0.1; trainer "
        f"compile flag: {result['compile']}.",
        f"- A measurement during which other processes took more than {result['contention_limit']:.0%} of "
        "the machine's CPU time is contended: flagged, run again, and left out of the medians.",
        "- Ratios: median over median, with the range the repeats allow (slowest over fastest to "
        "fastest over slowest); a range that includes 1.0 is *within noise*, not a win or a loss. On a "
        "GPU compare the anchor with the tf32 row: both use the frameworks' default arithmetic.",
        "- Anchor: `bench/anchors/<framework>_d2l.py`, the book's layers and training loop (bugs fixed): "
        "PyTorch and MXNet read loss and accuracy every step as `train_ch6` does; JAX jits only the loss "
        "and updates eagerly; TensorFlow steps eagerly under a GradientTape. *Book model, compiled step*: "
        "the same model with the whole step compiled (`jax.jit`, `tf.function`). Their batches are "
        "gathered before the clock starts, as the book's loaders prefetch them. Trainer: the project's, "
        "with the data set on the device and one host read per measured window.",
        "- Memory: on a CPU what the measured steps add to the process's resident set (high-water mark "
        "reset after the warm-up, `/proc/self/clear_refs`), the trainers' device-resident data set apart; "
        "peak: the process's whole peak RSS. On a GPU the allocator's peak, reset after the warm-up.",
        f"- Total time: {result['seconds']:.0f} s.",
        "",
        "## Against the book's loop",
        "",
        *verdicts(result),
        "",
    ]
    for shape in result["shapes"]:
        entries = [e for e in result["summary"] if e["shape"] == shape["name"]]
        entries = [e for e in entries if not (e["run"] == "anchor_compiled" and e["status"] == "skipped")]
        fastest = next((e["fastest_anchor"] for e in entries if e.get("fastest_anchor")), None)
        out += [
            f"## {shape['name']} ({shape['examples']:,} training images)",
            "",
            f"| backend | run | arithmetic | examples/s | vs own anchor | vs fastest anchor"
            f"{f' ({fastest})' if fastest else ''} | first step (s) | steps add | peak | device |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        out += [_cell_row(entry) for entry in entries] + [""]
    out += ["![examples per second](bench.png)", ""]
    return "\n".join(out)


def plot(result, path) -> None:
    """Median examples/s per backend with the repeats' range, one bar per run, one panel per shape."""
    plt = pyplot()
    shapes = result["shapes"]
    runs = list(RUN_LABELS)
    figure, axes = plt.subplots(1, len(shapes), figsize=(7.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        entries = [e for e in result["summary"] if e["shape"] == shape["name"]]
        backends = list(dict.fromkeys(e["backend"] for e in entries))
        width = 0.8 / len(runs)
        for i, run in enumerate(runs):
            found = [next((e for e in entries if e["backend"] == b and e["run"] == run), None) for b in backends]
            speeds = [e["examples_per_s"] if e and e["status"] == "ok" else None for e in found]
            medians = np.array([np.nan if s is None else s["median"] for s in speeds])
            errors = np.array(
                [[0, 0] if s is None else [s["median"] - s["min"], s["max"] - s["median"]] for s in speeds]
            ).T
            bars = ax.bar(
                np.arange(len(backends)) + (i - (len(runs) - 1) / 2) * width,
                medians,
                width,
                yerr=errors,
                capsize=2,
                label=RUN_LABELS[run],
                hatch="//" if run.startswith("anchor") else None,
            )
            ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:,.0f}" for v in medians], fontsize=6)
        ax.set_xticks(np.arange(len(backends)), backends)
        ax.set_ylabel("examples/s, median and range (higher is better)")
        ax.set_title(shape["name"])
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"{result['device_words']} - {result['date']}", fontsize=9)
    save_png(figure, path)


def files(device) -> tuple[str, ...]:
    return FILES
