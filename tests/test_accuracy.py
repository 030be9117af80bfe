"""The accuracy statistics: seed noise against a difference between backends."""

import json

import numpy as np
import pytest

from conformance import accuracy, cli, training


def test_same_distribution_is_not_called_different():
    rng = np.random.default_rng(1)
    samples = {name: list(0.8 + 0.03 * rng.standard_normal(10)) for name in ("a", "b", "c", "d")}
    result = accuracy.statistics(samples)
    assert not result["differ"] and result["kruskal"]["p"] > 0.05
    assert len(result["pairs"]) == 6 and not any(p["differ"] for p in result["pairs"])
    for p in result["pairs"]:
        assert p["ci"][0] < p["mean_difference"] < p["ci"][1]
    assert 0.015 < result["pooled_std"] < 0.045


def test_a_shifted_backend_is_found_with_its_effect_size():
    rng = np.random.default_rng(2)
    samples = {name: list(0.8 + 0.01 * rng.standard_normal(10)) for name in ("a", "b", "c")}
    samples["c"] = [x - 0.05 for x in samples["c"]]
    result = accuracy.statistics(samples)
    assert result["differ"] and result["kruskal"]["p"] < 1e-3
    by_pair = {tuple(p["pair"]): p for p in result["pairs"]}
    assert not by_pair[("a", "b")]["differ"]
    assert by_pair[("a", "c")]["differ"] and by_pair[("b", "c")]["differ"]
    low, high = by_pair[("a", "c")]["ci"]
    assert 0.03 < low < 0.05 < high < 0.07


def test_holm_matches_the_step_down_rule():
    # sorted 0.01, 0.02, 0.04 times 3, 2, 1: 0.03, 0.04, 0.04 (kept monotone)
    assert accuracy.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert accuracy.holm([0.5, 0.6]) == [1.0, 1.0]


def test_identical_accuracies_are_no_difference():
    result = accuracy.statistics({"a": [0.8, 0.8], "b": [0.8, 0.8]})
    assert not result["differ"] and result["kruskal"]["p"] == 1.0


def test_report_names_the_tests(tmp_path):
    runs = {
        n: [{"seed": s, "test_acc": 0.8 + 0.01 * s + d, "loss": 0.5} for s in range(5)]
        for n, d in (("a", 0), ("b", 0.001))
    }
    result = {
        "date": "today",
        "machine": {"cpu": "cpu", "cores": 2, "os": "linux"},
        "frameworks": {},
        "device": "cpu",
        "arch": "d2l",
        "recipe": {"name": "quick", "size": 32, "batch_size": 64, "lr": 0.1, "momentum": 0.0, "epochs": 2},
        "seeds": 5,
        "backends": {n: {"runs": r} for n, r in runs.items()},
        "statistics": accuracy.statistics({n: [x["test_acc"] for x in r] for n, r in runs.items()}),
    }
    text = accuracy.markdown(result)
    assert "Kruskal-Wallis" in text and "Mann-Whitney U" in text and "Holm" in text
    assert "| a - b | -0.0010 |" in text
    accuracy.plot(result, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000
    json.dumps(result)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["accuracy", "--seeds", "1", "--backends", "torch"], "at least 2 seeds"),
        (["accuracy", "--recipe", "nope", "--backends", "torch"], "unknown recipe 'nope'"),
        (["trajectory", "--runs", "float16-momentum-0", "--backends", "torch"], "unknown trajectory run(s)"),
        (["trajectory", "--setup", "nope", "--backends", "torch"], "unknown trajectory setup 'nope'"),
    ],
)
def test_bad_arguments_are_refused_in_our_words(argv, message, capsys, tmp_path):
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_the_books_recipes_are_named():
    d2l, d2l2 = training.get_recipe("d2l"), training.get_recipe("d2l2")
    assert (d2l.lr, d2l.batch_size, d2l.epochs, d2l.size) == (0.1, 256, 10, 96)
    assert (d2l2.lr, d2l2.batch_size, d2l2.epochs, d2l2.size) == (0.01, 128, 10, 96)


def test_the_quick_recipes_accuracy_rule_is_derived_from_its_seed_spread():
    """max_spread is the studentized range's 99% quantile for four backends times the pooled
    seed standard deviation measured by `densenet-xf accuracy` (the recipe's comment)."""
    quick = training.get_recipe("quick")
    assert quick.max_spread == round(training.accuracy_tolerance(training.QUICK_SEED_STD, 4), 3)
    # more backends scatter over a wider range; a rarer false alarm needs a wider one
    assert training.accuracy_tolerance(0.03, 2) < training.accuracy_tolerance(0.03, 4)
    assert training.accuracy_tolerance(0.03, 4, 0.01) < training.accuracy_tolerance(0.03, 4, 0.001)
