"""memory_<device>.json, .md and .png: densenet121's trainer plain against memory-efficient.

The target: the memory-efficient model needs at most half the plain model's memory for at
most 20% more time per step. Memory is what the measured training steps add after the
warm-up (conformance.bench.worker): on a CPU the resident set's high-water mark reset after
the warm-up, so that neither the framework's libraries nor a compiler's working set count;
on a GPU the allocator's peak above what it held when reset. The process's whole peak is
shown too.
"""

from __future__ import annotations

from ..reporting import machine_line, pyplot, save_png, versions_line
from .report import section_record

TARGET_MEMORY, TARGET_TIME = 0.5, 1.2
MODE_LABELS = {"plain": "plain", "memory_efficient": "memory-efficient"}


def files(device) -> tuple[str, ...]:
    return tuple(f"memory_{device}{suffix}" for suffix in (".json", ".md", ".png"))


def compare(plain: dict, efficient: dict) -> dict:
    """The two runs' memory and time per step, their ratios, and whether the target is met."""
    added = {mode: row["added_bytes"] or 0 for mode, row in (("plain", plain), ("efficient", efficient))}
    step = {mode: row["seconds"] / row["steps"] for mode, row in (("plain", plain), ("efficient", efficient))}
    memory_ratio = added["efficient"] / added["plain"] if added["plain"] > 0 else None
    time_ratio = step["efficient"] / step["plain"]
    return {
        "status": "ok",
        "peak_plain": plain["peak_bytes"],
        "peak_efficient": efficient["peak_bytes"],
        "peak_ratio": efficient["peak_bytes"] / plain["peak_bytes"],
        "added_plain": added["plain"],
        "added_efficient": added["efficient"],
        "memory_ratio": memory_ratio,
        "step_s_plain": step["plain"],
        "step_s_efficient": step["efficient"],
        "time_ratio": time_ratio,
        "peak_kind": plain["peak_kind"],
        "activations_plain": plain.get("activation_bytes"),
        "activations_efficient": efficient.get("activation_bytes"),
        "activations_ratio": ratio(plain.get("activation_bytes"), efficient.get("activation_bytes")),
        "activation_kind": plain.get("activation_kind"),
        "device": plain["device"],
        "arithmetic": plain["arithmetic"],
        "target_met": meets_target(memory_ratio, time_ratio),
        "target_met_own": meets_target(
            ratio(plain.get("activation_bytes"), efficient.get("activation_bytes")), time_ratio
        ),
    }


def meets_target(memory_ratio, time_ratio) -> bool | None:
    """At most TARGET_MEMORY of the memory for at most TARGET_TIME of the time (None: no memory measured)."""
    return None if memory_ratio is None else memory_ratio <= TARGET_MEMORY and time_ratio <= TARGET_TIME


def ratio(plain, efficient) -> float | None:
    return efficient / plain if plain and efficient is not None else None


def summarize(rows) -> list[dict]:
    """One entry per shape and backend: `compare` of its two runs, or why there is none."""
    return pair_up(rows, "plain", "memory_efficient", compare)


def pair_up(rows, first, second, compare) -> list[dict]:
    """One entry per shape and backend: `compare` of its runs in modes `first` and `second`,
    or the status and reason of the one that did not run."""
    out = []
    for shape, backend in dict.fromkeys((row["shape"], row["backend"]) for row in rows):
        runs = {row["mode"]: row for row in rows if row["shape"] == shape and row["backend"] == backend}
        pair = runs.get(first, {}), runs.get(second, {})
        failed = next((row for row in pair if row.get("status") != "ok"), None)
        entry = {"shape": shape, "backend": backend}
        if failed is None:
            entry.update(compare(*pair))
        else:
            entry.update(status=failed.get("status", "error"), reason=failed.get("reason", "no result"))
        out.append(entry)
    return out


def build(rows, device, shapes, warmup, steps, compile, seconds) -> dict:
    return section_record(rows, device, shapes, warmup, steps, compile, seconds) | {
        "target": {"memory_ratio": TARGET_MEMORY, "time_ratio": TARGET_TIME},
        "summary": summarize(rows),
    }


def _mib(value) -> str:
    return f"{value / 2**20:,.0f} MiB"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def _row(entry) -> str:
    if entry["status"] == "unsupported":
        return f"| {entry['backend']} | no mechanism in this framework: {one_line(entry['reason'])} |" + " |" * 13
    if entry["status"] != "ok":
        return f"| {entry['backend']} | {entry['status']}: {one_line(entry['reason'])} |" + " |" * 13
    verdict = {True: "yes", False: "no", None: "-"}
    return (
        f"| {entry['backend']} | {_mib(entry['added_plain'])} | {_mib(entry['added_efficient'])} | "
        f"{_ratio(entry['memory_ratio'])} | {_own(entry, 'activations_plain')} | "
        f"{_own(entry, 'activations_efficient')} | {_ratio(entry.get('activations_ratio'))} | "
        f"{_mib(entry['peak_plain'])} | {_mib(entry['peak_efficient'])} | "
        f"{entry['step_s_plain']:.3f} | {entry['step_s_efficient']:.3f} | {_ratio(entry['time_ratio'])} | "
        f"{verdict[entry['target_met']]} | {verdict[entry.get('target_met_own')]} | "
        f"{entry['device']}, {entry['arithmetic']} |"
    )


def _own(entry, key) -> str:
    return "-" if entry.get(key) is None else _mib(entry[key])


def one_line(text: str) -> str:
    return text.replace("|", "/").splitlines()[0] if text else ""


def own_kinds(result: dict) -> list[dict]:
    """The entries whose framework has its own activation measure (one per backend)."""
    seen = {e["backend"]: e for e in result["summary"] if e.get("activation_kind")}
    return list(seen.values())


def markdown(result: dict) -> str:
    versions = versions_line(result["frameworks"])
    kinds = sorted({e["peak_kind"] for e in result["summary"] if e["status"] == "ok"})
    out = [
        "# Memory: plain against memory-efficient (`memory_efficient=True`)",
        "",
        f"- Device: {result['device_words']}",
        f"- Machine: {machine_line(result['machine'])}",
        f"- Date: {result['date']}; Python {result['machine']['python']}; {result['machine']['os']}",
        f"- Versions: {versions}",
        f"- Each mode of each backend trained in a process of its own (peak memory is per process): the "
        f"project's trainer, SGD, {result['warmup']} warm-up step(s), then {result['steps']} measured steps.",
        f"- Memory ({', '.join(kinds) or 'none measured'}): *training adds* is what the measured steps add "
        f"after the warm-up (the activations the backward pass keeps: what recomputation saves; no compiler "
        f"working set, no libraries); *peak* is the process's whole peak and includes the framework's own "
        f"libraries on a CPU.",
        "- *Own measure*: each framework's own measure of what a step keeps for its backward pass, in "
        "the same processes after the timing: "
        + ("; ".join(f"{e['backend']}: {e['activation_kind']}" for e in own_kinds(result)) or "none")
        + ".",
        f"- Target: memory at most {TARGET_MEMORY:.0%} of the plain model's for at most "
        f"{TARGET_TIME - 1:.0%} more time per step; judged on *training adds*, and beside it on the own "
        "measure. On a CPU an allocator that keeps the pages its warm-up freed (PyTorch's, TensorFlow's) "
        "hides the activations from the resident set: there the own measure is the one that sees them. "
        "Time per step: one process per mode, so a ratio near the 120% line can fall either side in "
        "another run.",
        f"- Total time: {result['seconds']:.0f} s.",
        "",
    ]
    head = [
        "| backend | training adds, plain | memory-efficient | ratio | own measure, plain | memory-efficient | "
        "ratio | peak, plain | memory-efficient | s/step, plain | memory-efficient | ratio | target met | "
        "on own measure | device |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    picture = f"![memory and time, plain and memory-efficient]({files(result['device'])[2]})"
    return "\n".join(out + shape_tables(result, head, _row, picture))


def shape_tables(result, head: list[str], row, picture: str) -> list[str]:
    """Per shape a heading and a table (`head`: its header lines, `row`: one entry's line), then the plot."""
    out = []
    for shape in result["shapes"]:
        out += [f"## {shape['name']}", "", *head]
        out += [row(e) for e in result["summary"] if e["shape"] == shape["name"]] + [""]
    return out + [picture, ""]


def plot(result, path) -> None:
    """Memory added by training and time per step, plain and memory-efficient, per backend."""
    import numpy as np

    plt = pyplot()
    entries = [e for e in result["summary"] if e["status"] == "ok"]
    figure, (memory, time) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(entries))
    for axis, key, scale, label in (
        (memory, "added", 2**-20, "memory training adds (MiB)"),
        (time, "step_s", 1.0, "seconds per step"),
    ):
        for offset, mode, hatch in ((-0.2, "plain", None), (0.2, "efficient", "//")):
            values = [e[f"{key}_{mode}"] * scale for e in entries]
            axis.bar(x + offset, values, 0.4, hatch=hatch, label="plain" if mode == "plain" else "memory-efficient")
        ratios = [e["memory_ratio" if key == "added" else "time_ratio"] for e in entries]
        for i, (e, ratio) in enumerate(zip(entries, ratios)):
            axis.annotate(_ratio(ratio), (i + 0.2, e[f"{key}_efficient"] * scale), ha="center", va="bottom", fontsize=8)
        axis.set_ylim(
            top=1.3 * max([e[f"{key}_{mode}"] * scale for e in entries for mode in ("plain", "efficient")], default=1)
        )  # room for the legend above the bars
        axis.set_xticks(x, [e["backend"] for e in entries])
        axis.set_ylabel(f"{label} (lower is better)")
        axis.legend(fontsize=8)
    names = ", ".join(shape["name"] for shape in result["shapes"])
    figure.suptitle(f"{names} - {result['device_words']} - {result['date']}", fontsize=9)
    save_png(figure, path)
