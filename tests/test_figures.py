"""The site's figures, stage tables and results page: drawn and computed from the spec and the
committed result files, never typed in."""

import json

import pytest

from conformance.site import figures, pages, results
from conformance.specs import count_params, get_spec

pytest.importorskip("matplotlib", reason="matplotlib is not installed")


@pytest.mark.parametrize("name", sorted(figures.FIGURES))
def test_every_figure_is_an_svg_and_the_same_every_build(name):
    first, second = figures.FIGURES[name](), figures.FIGURES[name]()
    assert first.lstrip().startswith("<?xml") and "<svg" in first
    assert first == second  # no date or random ids: an unchanged spec leaves the file unchanged


def test_channel_growth_is_computed_from_the_spec():
    drawn = figures.channel_growth("d2l")
    spec = get_spec("d2l")
    assert f"growth {spec.growth_rate}" in drawn and str(spec.block_config) in drawn
    for width in (64, 96, 192, 112, 248):  # stem, first layer, first block, transition2, last
        assert f">{width}<" in drawn, width
    assert ">280<" not in figures.channel_growth("d2l")  # no width the d2l net does not have
    assert ">1024<" in figures.channel_growth("densenet121")


@pytest.mark.parametrize(("arch", "size", "total"), [("d2l", 96, "758,226"), ("densenet121", 224, "7,978,856")])
def test_stage_tables_add_up_to_the_parameter_count(arch, size, total):
    table = figures.render_stages(arch, size)
    assert f"**{total}**" in table and f"{count_params(get_spec(arch))[0]:,}" == total
    assert sum(
        int(row.split("|")[4].replace(",", ""))
        for row in table.splitlines()
        if row.startswith("| ") and row.split("|")[4].strip().replace(",", "").isdigit()
    ) == int(total.replace(",", ""))


def test_d2l_stage_shapes_are_the_chapter_s():
    table = figures.render_stages("d2l", 96)
    assert "| stem | (1, 64, 24, 24) |" in table and "| denseblock4 | (1, 248, 3, 3) |" in table


def test_pages_ask_for_known_figures_only():
    with pytest.raises(LookupError, match="no figure 'nope'"):
        pages.expand("<!-- xf:figure nope -->", "blocks.md")
    assert "](figures/dense_block.svg)" in pages.expand("<!-- xf:figure dense_block -->", "blocks.md")
    assert "](../figures/dense_block.svg)" in pages.expand("<!-- xf:figure dense_block -->", "results/x.md")


def test_results_page_reads_the_committed_report():
    report = json.loads((results.RESULTS / "report.json").read_text())
    page = results.render_results()
    for final in report["training"]["final"].values():
        assert f"| {final['test_acc']:.3f} |" in page
    gpu = report["device"] == "gpu"
    assert ("not yet run" in page) != gpu and ("not yet run" in results.render_gpu_status()) != gpu
    bench = json.loads((results.RESULTS / "bench.json").read_text())
    for entry in bench["summary"]:
        if entry["run"] == "fp32" and entry["status"] == "ok":
            ratio = entry["vs_own_anchor"]
            assert f"| {ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f}) | {ratio['verdict']} |" in page


def test_results_page_says_not_yet_run_without_result_files(monkeypatch, tmp_path):
    monkeypatch.setattr(results, "RESULTS", tmp_path)
    page = results.render_results()
    assert "GPU: not yet run" in page and "No training run is recorded" in page and "Speed" in page
