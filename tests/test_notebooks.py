"""The site's notebooks: generated from the backends' sources, and every one runs."""

import importlib.util

import pytest

from conformance.site import listing, notebooks, snippets
from conformance.site.source import BACKENDS

pytest.importorskip("nbformat", reason="nbformat is not installed (the dev extra)")


def test_notebooks_are_the_same_file_for_the_same_sources():
    assert notebooks.generated_notebooks() == notebooks.generated_notebooks()
    assert set(notebooks.generated_notebooks()) == {f"notebooks/{package}.ipynb" for package in BACKENDS.values()} | {
        "notebooks/densenet_four_frameworks.ipynb"
    }


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_framework_notebook_holds_the_chapter_s_listings_cut_from_the_backend(backend):
    code = "\n".join(cell.source for cell in notebooks.framework_notebook(backend).cells if cell.cell_type == "code")
    for names in listing.BLOCKS:
        assert notebooks.definition_without_decorators(f"{BACKENDS[backend]}/model.py", names) in code
    assert "@keras.saving" not in code  # the package registers its classes; a notebook's copies do not
    assert f"from {BACKENDS[backend]} import" not in code  # the shapes run on the notebook's definitions


@pytest.mark.parametrize("name", sorted(notebooks.notebooks()))
def test_every_notebook_runs(name):
    pytest.importorskip("nbclient", reason="nbclient is not installed (the dev extra)")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (the dev extra)")
    backend = next((b for b, package in BACKENDS.items() if name == f"{package}.ipynb"), None)
    if backend and importlib.util.find_spec(snippets.FRAMEWORK[backend]) is None:
        pytest.skip(f"{snippets.FRAMEWORK[backend]} is not installed")
    nb = notebooks.execute(notebooks.notebooks()[name])
    printed = "".join(output.get("text", "") for cell in nb.cells for output in cell.get("outputs", []))
    errors = [output for cell in nb.cells for output in cell.get("outputs", []) if output.output_type == "error"]
    assert not errors
    assert ("DenseBlock output: (4, " in printed) if backend else ("largest difference from the reference" in printed)
