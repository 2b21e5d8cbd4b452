"""XLA options this project sets before JAX starts its backends: multiply-add contraction
in the kernels XLA compiles for NVIDIA GPUs (``config.xla_fma``, ``QLHS_XLA_FMA``).

XLA compiles its own fusions, and the Pallas (Triton) kernels of ``qlhs_jax.kernels``,
with LLVM's NVPTX backend, and leaves floating-point contraction off there: each ``a * b
+ c`` becomes a multiply and an add, each rounded, written ``mul.rn.f32`` and
``add.rn.f32`` so that ptxas may not fuse them either. LLVM's ``-nvptx-fma-level=1``
lets NVPTX emit ``fma.rn.f32``: one instruction and one rounding, what nvcc does by
default (``--fmad=true``) and what Triton's own compiler does (``enable_fp_fusion``).
Compiled for an H100 without one (jax[cuda12] 0.11.2; benchmarks/NOTES.md, experiment
36): du = D^T dx at stage 1 from 715 to 571 machine instructions a thread (its issue
floor from 0.275 to 0.219 ms, above the 0.171 ms to copy its bytes), the forward
product's XLA fusion at stage 2 from 257 to 218; over Eq.(3)'s step the sum of each
kernel's larger bound (issue floor or copy time) from 22.54 to 22.06 ms, ResNet50's
unchanged (30.13 and 30.12 ms: its kernels are bound by their bytes).

The values change by rounding only, as on another GPU: a contracted multiply-add rounds
once instead of twice. XLA reads ``XLA_FLAGS`` once, when JAX starts a backend, so
:func:`request_fma` must run before the first computation: ``train.train_and_evaluate``
calls it first thing (``qlhs_jax.main`` too, before ``jax.distributed.initialize``), and
the benchmark harnesses in their ``main``. Where a backend
has already started (a notebook that ran JAX code first), it says so and changes
nothing. It acts only where JAX may use an NVIDIA GPU (a CUDA plugin is installed and
``JAX_PLATFORMS``, if set, names cuda or gpu): the option is NVPTX's. And only where
this JAX's CPU backend compiles with it (:func:`cpu_backend_accepts`): JAX starts its CPU
backend beside the GPU's, and XLA hands the option to both compilers' LLVM. jaxlib
0.11.2 and 0.12.0.1 accept it there; 0.12.1's CPU compiler exits at its first compile
("Unknown command line argument"), so with it the GPU kernels compile without
contraction, and a warning says so.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import pkgutil
import re
import subprocess
import sys

FMA_OPTION = "-nvptx-fma-level=1"
ENV = "QLHS_XLA_FMA"  # "1" (the default) or "0": the benchmark harnesses' setting
_EXTRA = "--xla_backend_extra_options"
_LEVEL = re.compile(r"-nvptx-fma-level=(\d+)")

log = logging.getLogger(__name__)


def with_fma(xla_flags: str) -> str:
  """``xla_flags`` (an XLA_FLAGS value) with :data:`FMA_OPTION` among its LLVM options
  (``--xla_backend_extra_options``, comma-separated), added to the user's own if they
  set some; unchanged where they already set ``-nvptx-fma-level`` (their choice stands)."""
  if _LEVEL.search(xla_flags):
    return xla_flags
  tokens = xla_flags.split()
  for i, token in enumerate(tokens):
    if token.startswith(_EXTRA + "="):
      value = token[len(_EXTRA) + 1:]
      tokens[i] = f"{_EXTRA}={value + ',' if value else ''}{FMA_OPTION}"
      return " ".join(tokens)
  return " ".join(tokens + [f"{_EXTRA}={FMA_OPTION}"])


def fma_in_flags(xla_flags: str | None = None) -> bool:
  """Whether ``xla_flags`` (default: the environment's XLA_FLAGS) turn contraction on."""
  level = _LEVEL.search(os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags)
  return bool(level) and int(level.group(1)) > 0


def cuda_possible(environ=None) -> bool:
  """Whether JAX may start an NVIDIA GPU backend in this process: a CUDA plugin is
  installed and ``JAX_PLATFORMS``, if set, names cuda or gpu."""
  environ = os.environ if environ is None else environ
  platforms = environ.get("JAX_PLATFORMS", "").lower()
  if platforms and not {"cuda", "gpu"} & set(re.split(r"[,\s]+", platforms)):
    return False
  if importlib.util.find_spec("jax_plugins") is None:
    return False
  import jax_plugins
  return any(m.name.startswith("xla_cuda") for m in pkgutil.iter_modules(jax_plugins.__path__))


@functools.cache
def cpu_backend_accepts(option: str = FMA_OPTION) -> bool:
  """Whether this JAX's CPU backend compiles and runs with ``option`` among XLA's LLVM
  options, asked of a child Python on the CPU alone (once a process, about 2 s: only
  where :func:`request_fma` would set the option). A CPU LLVM that does not know the
  option exits the process at its first compile, so it cannot be asked in this one."""
  code = "import jax.numpy as j; print(float((j.arange(3.0) * 2 + 1).sum()))"
  env = dict(os.environ, XLA_FLAGS=f"{_EXTRA}={option}", JAX_PLATFORMS="cpu")
  try:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, timeout=300)
  except subprocess.TimeoutExpired:
    return False
  return p.returncode == 0 and p.stdout.strip() == "9.0"


def backends_started() -> bool:
  """Whether JAX has started its backends (XLA_FLAGS is read then, and not after)."""
  from jax._src import xla_bridge
  return xla_bridge.backends_are_initialized()


def env_setting(environ=None) -> bool:
  """``QLHS_XLA_FMA``: "1" or unset (on), "0" (off); anything else is refused by name."""
  value = (os.environ if environ is None else environ).get(ENV, "1")
  if value not in ("0", "1"):
    raise ValueError(f"{ENV}={value!r}: set 1 (multiply-add contraction on NVIDIA GPUs, "
                     f"the default) or 0 (XLA's own: a multiply and an add)")
  return value == "1"


def request_from_env() -> bool:
  """:func:`request_fma` as ``QLHS_XLA_FMA`` says (on unless "0"): the benchmark
  harnesses' call, first thing in their ``main``."""
  return request_fma(env_setting())


def request_fma(enabled: bool, environ=None) -> bool:
  """Adds :data:`FMA_OPTION` to XLA_FLAGS where ``enabled``, JAX may use an NVIDIA GPU,
  no backend has started yet and the CPU backend accepts the option. Returns whether the
  option is in XLA_FLAGS (so in effect where a GPU compiles). With ``enabled`` false, or
  a ``-nvptx-fma-level`` the user set, it changes nothing. A backend already started
  without it: logs a warning with the fix; a CPU backend that refuses it: a warning."""
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  if not enabled or _LEVEL.search(flags) or not cuda_possible(environ):
    return fma_in_flags(flags)  # off, a level the user chose (0 too), or no GPU
  if backends_started():
    log.warning("xla_fma: JAX started its backends before XLA_FLAGS held %s, so the GPU "
                "kernels compile without multiply-add contraction (slower, the same "
                "values up to rounding). Call qlhs_jax.xla_options.request_fma(True) "
                "before any JAX computation, or start Python with XLA_FLAGS=\"%s\".",
                FMA_OPTION, with_fma(flags))
    return False
  if not cpu_backend_accepts():
    log.warning("xla_fma: this jaxlib's CPU backend, which JAX starts beside the GPU's, "
                "exits at its first compile with %s among XLA's LLVM options (jaxlib "
                "0.12.1 does; 0.12.0.1 did not), so the GPU kernels compile without "
                "multiply-add contraction (the same values up to rounding; slower, "
                "benchmarks/NOTES.md experiment 36). config.xla_fma=False "
                "(QLHS_XLA_FMA=0) skips this check.", FMA_OPTION)
    return False
  environ["XLA_FLAGS"] = with_fma(flags)
  return True
