"""`densenet-xf accuracy`: do the backends' float32 test accuracies differ by more than seed noise?

Every backend trains the recipe with seeds 0..S-1 (`densenet-xf seed-spread`, one process per
backend, so frameworks never share one); the seeds change the initial weights and the data
order, and seed N is the same weights and batches in every backend. The final test accuracies
are then compared as samples:

- Kruskal-Wallis (`scipy.stats.kruskal`): do the backends' accuracy distributions differ at all?
- every pair, Mann-Whitney U (`scipy.stats.mannwhitneyu`, two-sided), p-values Holm-corrected
  for the number of pairs;
- every pair, the difference of mean accuracies with a bootstrap confidence interval
  (`scipy.stats.bootstrap`, percentile method): the effect size, in accuracy points.

Seeds run in rounds of ROUND per backend, so that a run stopped early has every backend at about
the same count; each seed's run is a run directory, and running the command again trains only
what is missing. Writes accuracy_<device>.json, .md and .png.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from . import training
from .files import read_json
from .reporting import publish_files, pyplot, run_record, save_png, versions_line, write_files

ROUND = 5  # seeds per backend per round
ALPHA = 0.05  # significance level of every test
CONFIDENCE = 0.95  # of the bootstrap intervals
RESAMPLES = 10_000


def files(device: str) -> tuple[str, str, str]:
    return f"accuracy_{device}.json", f"accuracy_{device}.md", f"accuracy_{device}.png"


def train_seeds(backend: str, recipe: str, seeds: int, out_dir: Path, arch: str, device: str, data_dir) -> dict:
    """`densenet-xf seed-spread` for one backend in a process of its own (its progress bar on
    stderr); its summary, or {"status": "skipped" or "error", "reason": ...}."""
    command = [sys.executable, "-m", "conformance", "seed-spread", "--backend", backend, "--recipe", recipe]
    command += ["--seeds", str(seeds), "--out", str(out_dir / backend), "--arch", arch, "--device", device]
    command += ["--progress"] + (["--data-dir", str(data_dir)] if data_dir else [])
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as process:
        tail = b""
        while chunk := os.read(process.stderr.fileno(), 4096):  # passed on as it comes: the progress bar
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail = (tail + chunk)[-4096:]
    if process.returncode == 0:
        return read_json(out_dir / backend / "seed-spread.json")
    lines = tail.decode(errors="replace").strip().splitlines()
    reason = lines[-1] if lines else f"exit code {process.returncode}"
    return {"status": "skipped" if "is not available" in reason else "error", "reason": reason}


def run(backends, recipe_name: str, seeds: int, out_dir, arch="d2l", device="cpu", data_dir=None, publish=None):
    recipe = training.get_recipe(recipe_name)
    if seeds < 2:
        raise ValueError(f"--seeds {seeds}: the tests need at least 2 seeds per backend (5 or more to mean much)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for target in sorted({*range(min(ROUND, seeds), seeds, ROUND), seeds}):
        for name in backends:
            if summaries.get(name, {}).get("status") in ("skipped", "error"):
                continue
            print(f"accuracy: {name}, recipe {recipe.name}, seeds 0-{target - 1} ...", flush=True)
            summaries[name] = train_seeds(name, recipe.name, target, out_dir, arch, device, data_dir)
            if "status" in summaries[name]:
                print(f"accuracy: {name}: {summaries[name]['status']}: {summaries[name]['reason']}", flush=True)
    samples = {name: [r["test_acc"] for r in s["runs"]] for name, s in summaries.items() if "runs" in s}
    result = {
        **run_record(),
        "device": device,
        "arch": arch,
        "recipe": summaries[next(iter(samples))]["recipe"] if samples else None,
        "seeds": seeds,
        "backends": {name: {k: v for k, v in s.items() if k != "recipe"} for name, s in summaries.items()},
        "statistics": statistics(samples) if len(samples) >= 2 else None,
    }
    json_name, md_name, png_name = files(device)
    write_files(out_dir, result, json_name, md_name, markdown, {png_name: plot})
    if publish:
        publish_files(out_dir, Path(publish), files(device))
    return result


def holm(p_values) -> list[float]:
    """Holm's step-down correction: the k-th smallest of m p-values times m - k + 1, kept
    monotone and at most 1 (scipy.stats has Benjamini-Hochberg, not Holm)."""
    order = np.argsort(p_values)
    adjusted = np.empty(len(p_values))
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def statistics(samples: dict, alpha: float = ALPHA, confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """The tests of the module docstring on {backend: [final test accuracy per seed]}."""
    from scipy import stats

    values = {name: np.asarray(v, dtype=float) for name, v in samples.items()}
    per_backend = {
        name: {
            "n": len(v),
            "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()),
            "max": float(v.max()),
        }
        for name, v in values.items()
    }
    pooled = np.concatenate([v - v.mean() for v in values.values()])
    dof = len(pooled) - len(values)
    pooled_std = float(np.sqrt((pooled**2).sum() / dof)) if dof > 0 else 0.0
    if len({float(x) for v in values.values() for x in v}) > 1:
        kw = stats.kruskal(*values.values())
        kruskal = {"statistic": float(kw.statistic), "p": float(kw.pvalue)}
    else:  # every accuracy identical: no difference to test
        kruskal = {"statistic": 0.0, "p": 1.0}
    pairs = []
    for a, b in itertools.combinations(values, 2):
        mw = stats.mannwhitneyu(values[a], values[b], alternative="two-sided")
        difference = float(values[a].mean() - values[b].mean())
        interval = stats.bootstrap(
            (values[a], values[b]),
            lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis),
            confidence_level=confidence,
            n_resamples=RESAMPLES,
            method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval
        pairs.append(
            {
                "pair": [a, b],
                "mean_difference": difference,
                "ci": [float(interval.low), float(interval.high)],
                "u": float(mw.statistic),
                "p": float(mw.pvalue),
            }
        )
    for pair, adjusted in zip(pairs, holm([p["p"] for p in pairs])):
        pair["p_holm"] = adjusted
        pair["differ"] = adjusted < alpha
    return {
        "alpha": alpha,
        "confidence": confidence,
        "per_backend": per_backend,
        "pooled_std": pooled_std,
        "kruskal": kruskal,
        "differ": kruskal["p"] < alpha,
        "pairs": pairs,
    }


# ---------------------------------------------------------------------------------------
# Report


def verdict(result: dict) -> str:
    s = result["statistics"]
    if s is None:
        return "fewer than two backends trained: nothing to compare"
    k = s["kruskal"]
    if s["differ"]:
        return f"the backends' accuracies differ by more than seed noise (Kruskal-Wallis p = {k['p']:.3g})"
    return (
        f"no difference beyond seed noise (Kruskal-Wallis H = {k['statistic']:.2f}, p = {k['p']:.3g} >= {s['alpha']})"
    )


def markdown(result: dict) -> str:
    recipe = result["recipe"] or {}
    out = [
        f"# Float32 test accuracy across backends, against seed noise ({result['device']})",
        "",
        f"- date: {result['date']}",
        f"- machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, {result['machine']['os']}",
        "- frameworks: " + versions_line(result["frameworks"]),
        f"- recipe `{recipe.get('name')}`: {result['arch']} net at {recipe.get('size')}x{recipe.get('size')}, "
        f"batch {recipe.get('batch_size')}, lr {recipe.get('lr')}, momentum {recipe.get('momentum')}, "
        f"{recipe.get('epochs')} epochs, {recipe.get('train_examples') or 60000} training and "
        f"{recipe.get('test_examples') or 10000} test images; seeds 0-{result['seeds'] - 1} per backend "
        "(seed N: the same initial weights and batch order in every backend)",
        "- made by: `densenet-xf accuracy` (conformance/accuracy.py)",
        "",
        f"**Verdict: {verdict(result)}.**",
        "",
    ]
    for name, b in result["backends"].items():
        if "status" in b:
            out.append(f"- {name}: {b['status']}: {b['reason']}")
    s = result["statistics"]
    if s is None:
        return "\n".join(out) + "\n"
    out += [
        "| backend | seeds | mean test accuracy | standard deviation | min | max |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in s["per_backend"].items():
        out.append(f"| {name} | {p['n']} | {p['mean']:.4f} | {p['std']:.4f} | {p['min']:.4f} | {p['max']:.4f} |")
    out += [
        "",
        f"Pooled within-backend standard deviation (seed noise): {s['pooled_std']:.4f}.",
        "",
        f"Pairwise: Mann-Whitney U (two-sided), p-values Holm-corrected for {len(s['pairs'])} pairs; the mean "
        f"difference with its {s['confidence']:.0%} bootstrap interval ({RESAMPLES:,} resamples, percentile).",
        "",
        f"| pair | mean difference | {s['confidence']:.0%} interval | U | p | p (Holm) | differ at {s['alpha']} |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in s["pairs"]:
        out.append(
            f"| {p['pair'][0]} - {p['pair'][1]} | {p['mean_difference']:+.4f} | "
            f"[{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}] | {p['u']:.1f} | {p['p']:.3g} | {p['p_holm']:.3g} | "
            f"{'yes' if p['differ'] else 'no'} |"
        )
    out += ["", f"![test accuracy per seed and backend]({files(result['device'])[2]})"]
    return "\n".join(out) + "\n"


def plot(result: dict, path) -> None:
    """A box per backend with every seed's accuracy as a point."""
    s = result["statistics"]
    if s is None:
        return
    plt = pyplot()
    samples = {name: b["runs"] for name, b in result["backends"].items() if "runs" in b}
    figure, axis = plt.subplots(figsize=(6.5, 4))
    names = list(samples)
    data = [[r["test_acc"] for r in samples[name]] for name in names]
    axis.boxplot(data, showmeans=True, widths=0.5)
    jitter = np.random.default_rng(0)
    for i, values in enumerate(data, start=1):
        axis.scatter(i + jitter.uniform(-0.12, 0.12, len(values)), values, s=16, alpha=0.7, zorder=3)
    axis.set_xticks(range(1, len(names) + 1), names)
    axis.set_ylabel("final test accuracy")
    recipe = result["recipe"]["name"]
    axis.set_title(f"Recipe {recipe}, {result['seeds']} seeds per backend: Kruskal-Wallis p = {s['kruskal']['p']:.3g}")
    axis.grid(alpha=0.3, axis="y")
    save_png(figure, path)


def load(out_dir, device: str) -> dict:
    return json.loads((Path(out_dir) / files(device)[0]).read_text())
