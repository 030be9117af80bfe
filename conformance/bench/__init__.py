"""`densenet-xf bench` (`make bench`): the project's trainers timed against the d2l book's
code for each framework (bench/anchors/), in one run, on the same data and device.

Framework-free at import time: each measurement runs `python -m conformance.bench.worker`
in a process of its own (`harness`), and `report` turns the results into bench.json,
bench.md and bench.png.
"""
