from conformance.files import REPOSITORY as ROOT
from conformance.site import listing


def test_side_by_side_page_is_current():
    """docs/side_by_side.md is cut from the four model.py files; `make docs` rewrites it."""
    assert listing.OUTPUT.read_text() == listing.render()


def test_every_backend_defines_every_building_block():
    for title, package in listing.BACKENDS.items():
        defined = listing.definitions(f"{package}/model.py")
        missing = [names for names in listing.BLOCKS if not any(n in defined for n in names)]
        assert not missing, f"{title}: {missing}"


def test_the_training_parity_page_quotes_the_committed_accuracy_run():
    """The page's accuracy table is the committed `densenet-xf accuracy` result, not typed apart from it."""
    import json
    import re

    import numpy as np

    result = json.loads((ROOT / "docs" / "results" / "accuracy_cpu.json").read_text())
    page = (ROOT / "docs" / "training_parity.md").read_text()
    for name, backend in result["backends"].items():
        accuracies = [run["test_acc"] for run in backend["runs"]]
        row = re.search(rf"^\| {name} \| ([0-9.]+) \| ([0-9.]+) \|", page, re.MULTILINE)
        assert row, f"no row for {name}"
        assert float(row.group(1)) == round(float(np.mean(accuracies)), 4)
        assert float(row.group(2)) == round(float(np.std(accuracies, ddof=1)), 4)


def test_the_numerics_page_shows_every_derived_row_of_the_committed_report():
    """docs/numerics.md's table is rendered from docs/results/report.json: every float32 and
    arithmetic-mode row, with its derivation."""
    import json

    from conformance.site import pages, results

    report = json.loads((ROOT / "docs" / "results" / "report.json").read_text())
    page = pages.expand((ROOT / "docs" / "numerics.md").read_text(), "numerics.md")
    assert "xf:results" not in page
    rows = [r for r in report["rows"] if r.get("dtype") in results.NUMERICS_DTYPES]
    assert rows
    for row in rows:
        if row.get("derivation"):
            assert (
                f"| {row['config']} | {row['dtype']} | {row['check']} | {row['tolerance']:.1e} | {row['derivation']} |"
                in page
            )


def test_the_memory_page_shows_the_committed_bench_memory_run():
    import json

    from conformance.site import pages

    result = json.loads((ROOT / "docs" / "results" / "memory_cpu.json").read_text())
    page = pages.expand((ROOT / "docs" / "memory.md").read_text(), "memory.md")
    assert "xf:results" not in page
    for entry in result["summary"]:
        if entry["status"] == "ok" and entry.get("activations_ratio") is not None:
            assert f"| {entry['shape']} | {entry['activations_ratio']:.0%} | {entry['memory_ratio']:.0%} |" in page
