"""Cut definitions out of the project's source files by name, with their line numbers (`ast`)."""

from __future__ import annotations

import ast
from dataclasses import dataclass

from ..backends import FRAMEWORKS
from ..files import REPOSITORY as ROOT

BACKENDS = {name: framework.package for name, framework in FRAMEWORKS.items()}
TABS = {name: framework.title for name, framework in FRAMEWORKS.items()}


@dataclass(frozen=True)
class Definition:
    path: str  # relative to the repository root, e.g. "densenet_tf/model.py"
    name: str  # "stem", "Trainer.train_step", "BN_MOMENTUM"
    first_line: int  # 1-based, decorators included
    last_line: int
    code: str


def assigned_names(node: ast.stmt) -> list[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return [target.id for target in targets if isinstance(target, ast.Name)]


def named_nodes(body: list[ast.stmt], prefix: str = ""):
    """(dotted name, node) for the functions, classes and assignments of a body, recursing into
    classes, and into `with` blocks for what they define (MXNet builds its loss in NumPy mode)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield prefix + node.name, node
            if isinstance(node, ast.ClassDef):
                yield from named_nodes(node.body, f"{prefix}{node.name}.")
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for name in assigned_names(node):
                yield prefix + name, node
        elif isinstance(node, ast.With):
            yield from named_nodes(node.body, prefix)


def definitions(path: str) -> dict[str, Definition]:
    """Every named definition of a source file (relative to the root), by dotted name."""
    lines = (ROOT / path).read_text().splitlines()
    found = {}
    for name, node in named_nodes(ast.parse("\n".join(lines)).body):
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        indent = len(lines[first - 1]) - len(lines[first - 1].lstrip())
        code = "\n".join(line[indent:] for line in lines[first - 1 : node.end_lineno])
        found[name] = Definition(path, name, first, node.end_lineno, code)
    return found


def find(path: str, name: str) -> Definition:
    """The definition `name` in `path`; a clear error naming what is there when it is missing."""
    if not (ROOT / path).is_file():
        raise LookupError(f"no file {path} in the repository (the site cuts code from it)")
    found = definitions(path)
    if name not in found:
        raise LookupError(f"{path} defines no {name!r}; it defines: {', '.join(sorted(found))}")
    return found[name]


def first_found(path: str, names: tuple[str, ...]) -> Definition:
    """The first of `names` that `path` defines (the d2l names, or their class spellings)."""
    found = definitions(path)
    for name in names:
        if name in found:
            return found[name]
    raise LookupError(f"{path} defines none of {', '.join(names)}")


# The framework-free modules the pages cut code from (the recipes, the data pipeline, the specs).
CORE_FILES = ("conformance/data.py", "conformance/specs.py", "conformance/training.py")


def source_files() -> list[str]:
    """The files that get a page of their own on the site: every backend module and CORE_FILES."""
    backends = sorted(
        str(path.relative_to(ROOT)) for package in BACKENDS.values() for path in (ROOT / package).glob("*.py")
    )
    return backends + list(CORE_FILES)
