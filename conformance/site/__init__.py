"""The teaching site (mkdocs-material, `make docs`): pages in docs/, code cut from the backends.

Framework-free: listings are cut from the source files with `ast`, and the runnable snippets
in docs/snippets/ run in their own processes (`snippets.run`), never imported here.
"""
