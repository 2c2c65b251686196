#!/usr/bin/env python
"""Compares runs: runs `python -m trainer.compare` with the same flags and arguments.

  scripts/compare_runs.py runs/flowers --out=runs/flowers/report
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("trainer.compare", run_name="__main__", alter_sys=True)
