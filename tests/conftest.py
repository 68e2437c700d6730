"""Fixtures shared by the test files (the root conftest.py sets up devices and paths first)."""

import jax
import pytest


@pytest.fixture(scope="session")
def eight_devices():
    """Sharding tests need the 8 simulated CPU devices the root conftest.py asks XLA for."""
    assert jax.device_count() >= 8, "the root conftest.py must set --xla_force_host_platform_device_count=8"
