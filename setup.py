"""Builds steerflow's one optional compiled part, the exact assignment solver (``steerflow/couplings/_lap.c``).

Everything else is declared in ``pyproject.toml``. The extension is optional: without a C compiler the
install still succeeds and ``ExactOT`` falls back to POT's network simplex or scipy.
"""
import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3"]
setup(ext_modules=[Extension("steerflow.couplings._lap", ["steerflow/couplings/_lap.c"], extra_compile_args=flags,
                             optional=True)])
