"""The site's notebooks (nbformat): one per framework and one that runs all four on the same input.

Generated from the same sources as the pages: each framework's notebook holds the chapter's
listings cut from its `model.py` (so a student can change them and run them again) and the
shapes snippet from docs/snippets, which then runs on the notebook's own definitions. The
tests execute every notebook with nbclient; `make docs` puts them on the site, unexecuted,
as notebooks/<name>.ipynb.
"""

from __future__ import annotations

import ast

from . import listing, snippets, source
from .source import BACKENDS, ROOT, TABS

RUN_IT = (
    "Run it from a clone of the repository where `{package}` imports (`make setup` builds the "
    "environment): start Jupyter in the repository root, or run every cell with "
    "`python -m conformance.site.notebooks --run {name}`."
)


# What a notebook does first, as the book's code does: MXNet's NumPy interface for the whole
# process (the package scopes it to its own calls with @use_np, which the copies below leave out).
SETUP = {"mxnet": "from mxnet import npx\n\nnpx.set_np()\n"}


def definition_without_decorators(path: str, names: tuple[str, ...]) -> str:
    """The first of `names` that `path` defines, from its `def` or `class` line: decorators
    (Keras' registration for saving) belong to the package, not to a notebook's copy."""
    found = source.first_found(path, names)
    node = next(
        node
        for node in ast.parse((ROOT / path).read_text()).body
        if getattr(node, "name", None) == found.name.split(".")[-1]
    )
    return "\n".join(found.code.splitlines()[node.lineno - found.first_line :])


def framework_notebook(backend: str):
    import nbformat.v4 as nbf

    package, title = BACKENDS[backend], TABS[backend]
    name = notebook_name(backend)
    cells = [
        nbf.new_markdown_cell(
            f"# DenseNet in {title}\n\nThe chapter's building blocks as `{package}/model.py` defines them "
            "(cut from the file when this notebook was generated), then the chapter's shape walk-through "
            "on these very definitions. " + RUN_IT.format(package=package, name=name)
        ),
        nbf.new_code_cell(
            "# The helpers the listings use (batch_norm, conv, ...); the cells below define the four again.\n"
            f"from {package}.model import *  # noqa: F403\n" + SETUP.get(backend, "")
        ),
    ]
    for names in listing.BLOCKS:
        cells.append(nbf.new_markdown_cell(f"## `{names[0]}`"))
        cells.append(nbf.new_code_cell(definition_without_decorators(f"{package}/model.py", names)))
    shapes = snippets.Snippet("shapes", backend).code
    own = "\n".join(line for line in shapes.splitlines() if not line.startswith(f"from {package} import"))
    cells.append(nbf.new_markdown_cell("## Shapes, stage by stage, with the definitions above"))
    cells.append(nbf.new_code_cell(own.strip()))
    return notebook(cells)


def comparison_notebook():
    import nbformat.v4 as nbf

    name = notebook_name("all")
    cells = [
        nbf.new_markdown_cell(
            "# One DenseNet, four frameworks, the same numbers\n\nEvery installed framework builds the same "
            "small DenseNet, loads the same canonical weights and runs the same batch; the logits are compared "
            "with the project's NumPy float64 reference. " + RUN_IT.format(package="densenet_torch", name=name)
        ),
        nbf.new_code_cell(
            "import importlib.util\n\n"
            "import numpy as np\n\n"
            "from conformance import reference, weights\n"
            "from conformance.backends import load_backend\n"
            "from conformance.suite import checks\n"
            "from conformance.specs import get_spec, to_layout\n\n"
            'spec = get_spec("tiny_d2l")  # the d2l net in small: no bottleneck, conv bias\n'
            "state = weights.init_state(spec, seed=0, randomize_bn=True)\n"
            "x, _ = checks.make_batch(spec, 13, 2, seed=0)  # NCHW, float32\n"
            "expected = reference.forward(spec, state, x.astype(np.float64))\n"
            'print("reference logits:", expected.shape)'
        ),
        nbf.new_code_cell(
            'frameworks = {"torch": "torch", "mxnet": "mxnet", "tf": "tensorflow", "jax": "flax"}\n'
            "logits = {}\n"
            "for name, module in frameworks.items():\n"
            "    if importlib.util.find_spec(module) is None:\n"
            '        print(f"{name}: not installed here")\n'
            "        continue\n"
            "    backend = load_backend(name)\n"
            "    model = backend.build(spec)\n"
            "    backend.load_state(model, state)\n"
            "    logits[name] = backend.forward(model, to_layout(x, backend.layout), train=False)\n"
            "    error = np.abs(logits[name] - expected).max()\n"
            '    print(f"{name:6} {backend.layout}: largest difference from the reference {error:.1e}")\n'
            "    assert error < 1e-4, error"
        ),
        nbf.new_code_cell(
            "names = list(logits)\n"
            "for i, a in enumerate(names):\n"
            "    for b in names[i + 1 :]:\n"
            '        print(f"{a} vs {b}: {np.abs(logits[a] - logits[b]).max():.1e}")'
        ),
    ]
    return notebook(cells)


def notebook(cells):
    import nbformat.v4 as nbf

    nb = nbf.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"  # the same file for the same sources: no random ids
    return nb


def notebook_name(backend: str) -> str:
    return "densenet_four_frameworks.ipynb" if backend == "all" else f"{BACKENDS[backend]}.ipynb"


def notebooks() -> dict[str, object]:
    """File name -> notebook, one per framework and the comparison."""
    found = {notebook_name(backend): framework_notebook(backend) for backend in BACKENDS}
    found[notebook_name("all")] = comparison_notebook()
    return found


def generated_notebooks() -> dict[str, str]:
    """Site path -> .ipynb text."""
    import nbformat

    return {f"notebooks/{name}": nbformat.writes(nb) for name, nb in notebooks().items()}


def execute(nb, timeout: int = 600):
    """Run every cell in a fresh kernel, in the repository root, with this tree importable."""
    import os

    from nbclient import NotebookClient

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    for key, value in snippets.environment().items():
        os.environ.setdefault(key, value)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    return nb


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Run one of the site's notebooks, as generated now.")
    parser.add_argument("--run", required=True, choices=sorted(notebooks()), help="the notebook's file name")
    args = parser.parse_args(argv)
    nb = execute(notebooks()[args.run])
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            print(output.get("text", ""), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
