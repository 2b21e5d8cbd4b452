"""Shared test fixtures. Tests run on the CPU with tiny models."""

import os

# Several CPU devices for the sharding tests; must be set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
