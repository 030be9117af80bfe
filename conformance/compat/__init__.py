"""`make compat VERSIONS=<name>`: the project against another set of framework versions.

Each version set (sets.py) gets a venv of its own under `.compat/<name>/` (`pins` is the
project's own `.venv`); in it run the fast contract tests and `densenet-xf check` on a small
matrix, each backend whose framework is installed. What passed goes to
`docs/results/compat/<name>.json`, and `docs/compat.md` is rendered from those files.
"""
