"""The teaching site (mkdocs-material, `make docs`): pages in docs/, code cut from the backends.

Framework-free: listings are cut from the source files with `ast` (source, pages), the runnable
snippets in docs/snippets/ run in their own processes (`snippets.run`), never imported here,
the figures and stage tables are drawn from the specs (figures), the results page reads the
committed docs/results/*.json (results), and the notebooks are generated from the same
sources (notebooks) and run in a kernel of their own.
"""
