"""Shared test settings. Tests run on the CPU with tiny models."""

import os
import tempfile

# Several CPU devices for the sharding tests; must be set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Many tests compile the same tiny programs (each train_and_evaluate jits afresh):
# JAX's persistent compilation cache, shared by the xdist workers and the subprocesses
# the tests start, compiles each once. Entries are keyed by program and jax version.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "qlhs_jax_test_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
