"""The results page a lecture can show (`<!-- xf:results -->`), read from the committed result files.

Every number comes from docs/results/*.json, which `make results` and `make bench --publish`
write; nothing is typed in. Where a file or a device has no run, the page says "not yet run".
"""

from __future__ import annotations

import json

from ..reporting import machine_line
from ..training import RECIPES
from .source import ROOT, TABS

RESULTS = ROOT / "docs" / "results"
NOT_YET_RUN = "not yet run"


def read(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def describe_recipe(name: str) -> str:
    recipe = RECIPES[name]
    images = f"{recipe.train_examples:,}" if recipe.train_examples else "all 60,000"
    tests = f"{recipe.test_examples:,}" if recipe.test_examples else "all 10,000"
    return (
        f"recipe `{name}`: {images} training images at {recipe.size}x{recipe.size}, {tests} test images, "
        f"batch {recipe.batch_size}, SGD lr {recipe.lr}, momentum {recipe.momentum}, {recipe.epochs} epochs"
    )


def training_section(report: dict | None) -> list[str]:
    if report is None or not report.get("training"):
        return ["No training run is recorded: " + NOT_YET_RUN + ".", ""]
    training = report["training"]
    machine = report["machine"]
    out = [
        f"From `docs/results/report.json` ({report['date']}, {report['device']}: {machine['cpu']}, "
        f"{machine['cores']} cores), {describe_recipe(training['recipe'])}, the same initial weights and "
        "batch order in every framework:",
        "",
        "| framework | test accuracy | train accuracy | last-epoch loss | examples/s | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for backend, final in training["final"].items():
        out.append(
            f"| {TABS[backend]} | {final['test_acc']:.3f} | {final['train_acc']:.3f} | {final['loss']:.3f} "
            f"| {final['examples_per_s']:,.0f} | {final['seconds']:.1f} |"
        )
    out += ["", "![Training curves of the four frameworks](results/learning_curves.png)", ""]
    return out


def speed_section(bench: dict | None) -> list[str]:
    if bench is None:
        return ["Speed against the book's loops: " + NOT_YET_RUN + ".", ""]
    out = [
        f"From `docs/results/bench.json` ({bench['date']}, {bench['device_words']}): each framework's trainer "
        "in float32 against the d2l book's own code for that framework (`bench/anchors/`), on the same "
        f"shape, each measured {bench['repeats']} times: median examples/s, and the ratio with the range the "
        "repeats allow. Above 1 is faster than the book's loop; a range that includes 1 is within noise.",
        "",
        "| framework | shape | book's loop, examples/s | ours, examples/s | ours / book's | verdict |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    entries = {(e["backend"], e["run"], e["shape"]): e for e in bench["summary"] if e["status"] == "ok"}
    for (backend, run, shape), entry in entries.items():
        anchor = entries.get((backend, "anchor", shape))
        if run == "fp32" and anchor:
            ratio = entry["vs_own_anchor"]
            out.append(
                f"| {TABS[backend]} | {shape} | {anchor['examples_per_s']['median']:,.0f} "
                f"| {entry['examples_per_s']['median']:,.0f} | {ratio['median']:.2f} "
                f"({ratio['min']:.2f}-{ratio['max']:.2f}) | {ratio['verdict']} |"
            )
    return out + [""]


def gpu_status(report: dict | None, bench: dict | None) -> str:
    """'measured ...' where a committed file records a GPU run, else 'not yet run'."""
    on_gpu = [
        name
        for name, data in (("conformance report", report), ("benchmark", bench))
        if data and data["device"] == "gpu"
    ]
    return f"measured ({', '.join(on_gpu)})" if on_gpu else NOT_YET_RUN


# The rows of docs/numerics.md's table: float32 and the trainer arithmetic modes, whose
# tolerances are derived (float64's are fixed, near machine precision).
NUMERICS_DTYPES = ("float32", "fp32", "tf32", "bf16")


def numerics_section(report: dict | None) -> list[str]:
    """Every float32 and arithmetic-mode row of the committed report: its tolerance, the
    derivation behind it and each backend's measured error."""
    if report is None:
        return ["Measured errors: " + NOT_YET_RUN + ".", ""]
    names = list(report["backends"])
    machine = report["machine"]
    out = [
        f"From `docs/results/report.json` ({report['date']}, {report['device']}: {machine['cpu']}, "
        f"{machine['cores']} cores): the rows of `make conformance` whose tolerance is derived.",
        "",
        "| net | dtype or mode | check | tolerance | derivation | " + " | ".join(TABS[n] for n in names) + " |",
        "|---" * (len(names) + 5) + "|",
    ]
    for row in report["rows"]:
        measured = any("error" in r or r.get("skipped") for r in row["results"].values())
        if row.get("dtype") not in NUMERICS_DTYPES or not measured:
            continue
        tolerance = f"{row['tolerance']:.1e}" if row.get("tolerance") is not None else "-"
        cells = [numerics_cell(row["results"].get(name)) for name in names]
        out.append(
            f"| {row['config']} | {row['dtype']} | {row['check']} | {tolerance} | {row.get('derivation', '-')} | "
            + " | ".join(cells)
            + " |"
        )
    return out + [""]


def numerics_cell(result: dict | None) -> str:
    if result is None:
        return "-"
    if result.get("skipped"):
        return "skipped"
    return f"{result['error']:.1e}" + ("" if result.get("passed") else " (fails)")


def memory_section(result: dict | None) -> list[str]:
    """The committed memory section of `make bench`: memory-efficient against plain, per framework."""
    if result is None:
        return ["Memory, plain against memory-efficient: " + NOT_YET_RUN + ".", ""]
    machine = result["machine"]
    out = [
        f"From `docs/results/memory_{result['device']}.json` ({result['date']}, {result['device_words']}; "
        f"{machine_line(machine)}): memory-efficient against plain, {result['warmup']} warm-up and "
        f"{result['steps']} measured steps in a process per mode.",
        "",
        "| framework | shape | own measure | training adds (resident set) | time per step | target met: own measure "
        "| resident set |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    verdict = {True: "yes", False: "no", None: "-"}
    for entry in result["summary"]:
        if entry["status"] != "ok":
            words = "no mechanism in this framework" if entry["status"] == "unsupported" else entry["status"]
            out.append(f"| {TABS[entry['backend']]} | {entry['shape']} | {words} | | | | |")
            continue
        out.append(
            f"| {TABS[entry['backend']]} | {entry['shape']} | {percent(entry.get('activations_ratio'))} "
            f"| {percent(entry['memory_ratio'])} | {percent(entry['time_ratio'])} "
            f"| {verdict[entry.get('target_met_own')]} | {verdict[entry['target_met']]} |"
        )
    return out + [""]


def percent(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def render_gpu_status() -> str:
    return f"**GPU: {gpu_status(read('report.json'), read('bench.json'))}.**\n"


def render_results() -> str:
    report, bench = read("report.json"), read("bench.json")
    status = gpu_status(report, bench)
    book = describe_recipe("d2l").removeprefix("recipe `d2l`: ")
    if status == NOT_YET_RUN:
        status += f". No run of the book's recipe (`d2l`: {book}) is recorded yet: the numbers below are on a CPU"
    lines = [
        f"**GPU: {status}.**",
        "",
        "## Accuracy",
        "",
        *training_section(report),
        "## Speed",
        "",
        *speed_section(bench),
    ]
    return "\n".join(lines)


def render_numerics() -> str:
    return "\n".join(numerics_section(read("report.json")))


def render_memory() -> str:
    return "\n".join(memory_section(read("memory_cpu.json")))


RENDER = {None: render_results, "gpu": render_gpu_status, "numerics": render_numerics, "memory": render_memory}
