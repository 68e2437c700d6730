"""Root conftest: runs before anything imports JAX (doctests of the package included)."""

import os
import sys

# Sharding tests simulate 8 devices; XLA reads this once, when JAX initialises its CPU backend.
# The tests' programs are small and compiled once each: compilation, not running, is most of the
# suite's time, and XLA's CPU backend at optimisation level 0 compiles them 2-3x faster (a Linen
# stack's highway step: 4.2 s -> 1.2 s). Benchmarks never run under this file.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
# Notebooks (executed by nbmake in their own kernels, which inherit this) run in quick mode.
os.environ.setdefault("HBPJAX_QUICK", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tests"))
