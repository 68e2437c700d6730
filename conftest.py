"""Root conftest: runs before anything imports JAX (doctests of the package included)."""

import os
import sys

# Sharding tests simulate 8 devices; XLA reads this once, when JAX initialises its CPU backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Notebooks (executed by nbmake in their own kernels, which inherit this) run in quick mode.
os.environ.setdefault("HBPJAX_QUICK", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tests"))
