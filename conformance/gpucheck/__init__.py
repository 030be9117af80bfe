"""`make gpu-check`: one prepared, time-boxed script for a GPU machine without network.

Every phase runs in processes of its own under a time box, and writes its results into one
folder as it goes, so a time-out keeps everything done so far; `publish` copies that folder's
results into docs/results/gpu/. `--rehearse` runs the same phases with tiny sizes on the CPU.
"""
