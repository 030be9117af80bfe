"""Markdown the site's pages are expanded into at build time (the mkdocs hook calls `expand`).

A hand-written page in docs/ holds no code of its own. It asks for code with three forms,
each replaced here by content tabs (PyTorch | MXNet | TensorFlow | JAX):

    <!-- xf:listing NAME -->           definitions cut from the backends (LISTINGS below)
    <!-- xf:run TOPIC -->              docs/snippets/TOPIC_<backend>.py and its output, run now
    <!-- xf:run TOPIC markdown -->     the same, the output shown as Markdown (a table)
    [text](xf:PATH:NAME)               a link to the line where PATH defines NAME

and three forms without tabs, for what is the same in every framework:

    <!-- xf:code PATH:NAME -->         one definition cut from any source file (a recipe, the data loader)
    <!-- xf:figure NAME -->            a figure drawn at build time (figures.FIGURES)
    <!-- xf:stages ARCH SIZE -->       every stage's output shape and parameters, computed from the spec
    <!-- xf:results -->                accuracy and speed read from the committed docs/results/*.json
    <!-- xf:results gpu -->            one line: measured on a GPU, or "not yet run"
    <!-- xf:results numerics -->       measured float32 and bf16 errors against their derived tolerances
    <!-- xf:results memory -->         the memory-efficient model against the plain one, make bench's CPU run

and every backend module gets a generated page, code/PATH.md, with numbered, linkable lines.
"""

from __future__ import annotations

import posixpath
import re
import textwrap

from . import figures, listing, notebooks, results, snippets, source
from .source import BACKENDS, TABS

# name -> the definitions each backend shows for it: (file in the package, names, first found wins).
LISTINGS: dict[str, dict[str, list[tuple[str, tuple[str, ...]]]]] = {
    names[0]: {backend: [("model.py", names)] for backend in BACKENDS} for names in listing.BLOCKS
}
LISTINGS["batch_norm"] = {
    backend: [("model.py", ("BN_MOMENTUM",)), ("model.py", ("batch_norm",))] for backend in BACKENDS
}
LISTINGS["loss"] = {backend: [("train.py", ("loss_fn",))] for backend in BACKENDS}
LISTINGS["optimizer"] = {backend: [("train.py", ("sgd",))] for backend in BACKENDS}
LISTINGS["train_step"] = {
    "torch": [("train.py", ("Trainer.step",))],
    "mxnet": [("train.py", ("Trainer.step",))],
    "tf": [("train.py", ("gradient_step",)), ("train.py", ("Trainer.step",))],
    "jax": [
        ("train.py", ("train_logits",)),
        ("train.py", ("loss_and_logits",)),
        ("train.py", ("grad_fn",)),
        ("train.py", ("train_step",)),
    ],
}
LISTINGS["MemoryEfficientDenseBlock"] = {
    backend: [("model.py", ("no_memory_efficient" if backend == "mxnet" else "MemoryEfficientDenseBlock",))]
    for backend in BACKENDS
}
# The data pipeline: the training set on the device once, then each step gathers its batch there.
LISTINGS["data_pipeline"] = {
    backend: [("train.py", ("Trainer.set_data",)), ("train.py", ("Trainer.step_on",))] for backend in BACKENDS
}
LISTINGS["data_pipeline"]["tf"].append(("train.py", ("Trainer.gather_step",)))
LISTINGS["data_pipeline"]["jax"].insert(0, ("train.py", ("gather_step",)))

DIRECTIVE = re.compile(r"^<!-- xf:(listing|run) ([\w]+)( markdown)? -->$", re.MULTILINE)
CODE = re.compile(r"^<!-- xf:code ([\w/.]+\.py):([\w.]+) -->$", re.MULTILINE)
FIGURE = re.compile(r"^<!-- xf:figure (\w+) -->$", re.MULTILINE)
STAGES = re.compile(r"^<!-- xf:stages (\w+) (\d+) -->$", re.MULTILINE)
RESULTS = re.compile(r"^<!-- xf:results(?: (gpu|numerics|memory))? -->$", re.MULTILINE)
LINK = re.compile(r"\]\(xf:([\w/.]+\.py):([\w.]+)\)")


def code_page(path: str) -> str:
    """The generated page's source path for a source file: code/densenet_tf/model.py.md."""
    return f"code/{path}.md"


def line_anchor(line: int) -> str:
    # pymdownx.highlight's id for line `line` of the page's first code block (anchor_linenums).
    return f"__codelineno-0-{line}"


def relative(target: str, page: str) -> str:
    return posixpath.relpath(target, posixpath.dirname(page) or ".")


def link_to(definition: source.Definition, page: str) -> str:
    return relative(code_page(definition.path), page) + "#" + line_anchor(definition.first_line)


def tab(title: str, body: str) -> str:
    return f'=== "{title}"\n\n' + textwrap.indent(body.strip("\n"), "    ") + "\n"


def fence(code: str, language: str = "python", options: str = "") -> str:
    return f"```{language}{' ' + options if options else ''}\n{code.rstrip()}\n```\n"


def render_definition(definition: source.Definition, page: str) -> str:
    where = f"[`{definition.path}`, line {definition.first_line}]({link_to(definition, page)})"
    return f"{where}\n\n" + fence(definition.code, options=f'linenums="{definition.first_line}"')


def render_listing(name: str, page: str) -> str:
    if name not in LISTINGS:
        raise LookupError(f"{page}: no listing {name!r}; known: {', '.join(LISTINGS)}")
    tabs = []
    for backend, wanted in LISTINGS[name].items():
        parts = [
            render_definition(source.first_found(f"{BACKENDS[backend]}/{file}", names), page) for file, names in wanted
        ]
        tabs.append(tab(TABS[backend], "\n".join(parts)))
    return "\n".join(tabs)


def render_snippet(snippet: snippets.Snippet, as_markdown: bool) -> str:
    path = snippet.path.relative_to(source.ROOT).as_posix()
    code = fence(snippet.code, options=f'title="{path}"')
    if not snippet.installed:
        return code + (
            f'\n!!! warning "Not run"\n    {snippets.FRAMEWORK[snippet.backend]} was not installed '
            "where this site was built, so this snippet's output is missing here.\n"
        )
    output = snippets.run(snippet)
    shown = output if as_markdown else fence(output, "text")
    return code + "\nOutput, computed when this site was built:\n\n" + shown


def render_run(topic: str, page: str, as_markdown: bool) -> str:
    found = snippets.snippets(topic)
    if not found:
        raise LookupError(f"{page}: no snippets docs/snippets/{topic}_<backend>.py")
    if len(found) == 1:  # one framework: no tab set (a page's tab sets all have the four)
        return f"**{TABS[found[0].backend]}**\n\n" + render_snippet(found[0], as_markdown)
    return "\n".join(tab(TABS[s.backend], render_snippet(s, as_markdown)) for s in found)


def expand(markdown: str, page: str) -> str:
    """A page's Markdown with its directives replaced and its xf: links resolved."""

    def directive(match):
        kind, name, as_markdown = match.groups()
        return render_listing(name, page) if kind == "listing" else render_run(name, page, bool(as_markdown))

    def link(match):
        path, name = match.groups()
        return f"]({link_to(source.find(path, name), page)})"

    markdown = CODE.sub(lambda m: render_definition(source.find(*m.groups()), page), markdown)
    markdown = FIGURE.sub(lambda m: figures.render_figure(m[1], page), markdown)
    markdown = STAGES.sub(lambda m: figures.render_stages(m[1], int(m[2])), markdown)
    markdown = RESULTS.sub(lambda m: results.RENDER[m[1]](), markdown)
    return LINK.sub(link, DIRECTIVE.sub(directive, markdown))


def render_code_page(path: str) -> str:
    text = (source.ROOT / path).read_text()
    page = code_page(path)
    names = [
        f"[`{d.name}`](#{line_anchor(d.first_line)})" for d in source.definitions(path).values() if "." not in d.name
    ]
    return (
        f"# `{path}`\n\nThe file as this site was built from it. Definitions: {', '.join(names)}.\n\n"
        + fence(text, options='linenums="1"')
        + f"\n[All source files]({relative('code/index.md', page)})\n"
    )


def render_code_index() -> str:
    rows = [
        f"| {TABS[backend]} | "
        + " ".join(
            f"[`{path.split('/')[1]}`]({relative(code_page(path), 'code/index.md')})"
            for path in source.source_files()
            if path.startswith(package + "/")
        )
        + " |"
        for backend, package in BACKENDS.items()
    ]
    rows.append(
        "| framework-free | "
        + " ".join(f"[`{path}`]({relative(code_page(path), 'code/index.md')})" for path in source.CORE_FILES)
        + " |"
    )
    return (
        "# Source code\n\nEvery backend module, as this site was built from it, with numbered lines "
        "that the other pages link to.\n\n| backend | files |\n| --- | --- |\n" + "\n".join(rows) + "\n"
    )


def generated_pages() -> dict[str, str]:
    """Source path on the site -> text, for the files that exist only at build time: the code
    pages (Markdown), the figures (SVG) and the notebooks (.ipynb)."""
    pages = {code_page(path): render_code_page(path) for path in source.source_files()}
    pages["code/index.md"] = render_code_index()
    return pages | figures.generated_figures() | notebooks.generated_notebooks()
