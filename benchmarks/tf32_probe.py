"""TF32 in the fused D + BatchNorm + product: what the GPU computed, and how far from float64.

  python benchmarks/tf32_probe.py              # the error table (CPU, any jax)
  python benchmarks/tf32_probe.py --compiled   # the sm_90a compile's float32 dots

The statistics of D u (s1 = k . tap sums, s2 = k^T M k), pass 3's sum of g * xhat and
dL/dkernel are float32 contractions of per-channel sums (`kernels.d_bn_product.
_stats_from_sums`). Until 2026-12-05 they were einsums at DEFAULT precision, and XLA
compiles a float32 dot for an NVIDIA GPU with TF32 inputs (10-bit mantissas); they are
now sums of float32 products. `--compiled` compiles the operation's forward and backward for the
H100 target of `qlhs_jax.benchmarks.aot` (no GPU needed; `pip install
"jax[cuda12]==0.11.2"`) and counts the float32 `tt.dot`s of XLA's Triton fusions by
their `inputPrecision`. On a CPU XLA computes float32 either way, so the table emulates
TF32: s2's einsum, the one XLA compiled to a dot, with its operands rounded to 10
mantissa bits,
and the operation's outputs and five gradients are compared with float64 autodiff of
the textbook formula (`d_bn_product.reference`), as tests/kernels do.

Result, 2026-12-05 (this project's 2-core CPU, jax 0.12.0.1; relative to the largest
float64 value; "float32" is the code since, "tf32" the s2 einsum with TF32 inputs, what
the GPU computed before):

| inputs | | mean | var | du | dc | dkernel | dscale |
|---|---|---:|---:|---:|---:|---:|---:|
| u ~ N(0.3, 1) | float32 | 1.5e-07 | 1.5e-07 | 1.5e-07 | 1.6e-07 | 1.3e-07 | 1.3e-07 |
| | tf32 | 1.8e-07 | 3.3e-04 | 2.0e-04 | 2.3e-04 | 9.3e-05 | 1.8e-04 |
| u offset by 3 sd | float32 | 1.9e-07 | 1.9e-06 | 6.9e-07 | 9.0e-07 | 9.8e-07 | 1.1e-06 |
| | tf32 | 2.0e-07 | 4.8e-03 | 1.2e-03 | 2.0e-03 | 1.0e-03 | 1.2e-03 |
| u offset by 100 sd, zero-sum k | float32 | 1.5e-06 | 2.7e-06 | 2.8e-07 | 3.3e-06 | 2.2e-06 | 1.7e-06 |
| | tf32 | 2.6e-06 | 1.3e-02 | 3.2e-04 | 7.0e-03 | 1.5e-05 | 2.1e-03 |

`--compiled` (jax[cuda12] 0.11.2): one float32 dot, `inputPrecision = tf32`, at a532631;
none since. In the whole Eq.(3) train step (`benchmarks.aot` with
`XLA_FLAGS=--xla_dump_emitter_re=triton-fusion`) the same s2 dot at each of the four
stages' shapes, and in both models the classifier head's three float32 matmuls, which
stay at DEFAULT (TF32 on the GPU: the common choice for a float32 head).
benchmarks/NOTES.md, experiment 27.
"""

import argparse
import functools
import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tf32(x):
  """x rounded to TF32's 10 mantissa bits (to nearest), as float32."""
  import jax
  import jax.numpy as jnp
  b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  b = (b + jnp.uint32(0x1000)) & jnp.uint32(0xFFFFE000)
  return jax.lax.bitcast_convert_type(b, jnp.float32)


def error_table():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from qlhs_jax.kernels import d_bn_product as dbn

  def loss_of(fn, weights):
    def loss(*args):
      p, mean, var = fn(*args)
      return ((p * weights[0]).sum() + (mean * weights[1]).sum()
              + (var * weights[2]).sum()).astype(jnp.float32)
    return loss

  exact = dbn._stats_from_sums

  def emulated(sums, k9):  # the code before 2026-12-05, with s2's dot in TF32
    s1 = jnp.einsum("tgn,tne->gne", sums[:9], k9)
    gram = sums[9:][jnp.asarray(dbn._PAIR_OF)]
    s2 = jnp.einsum("abgn,ane,bne->gne", tf32(gram), tf32(k9), tf32(k9))
    return s1, s2, sums
  rel = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()
                           / np.abs(np.asarray(b)).max())
  rng = np.random.default_rng(5)
  c = rng.standard_normal((4, 16, 16, 32))
  weights = (rng.standard_normal(c.shape), rng.standard_normal((1, 32)),
             rng.standard_normal((1, 32)))
  k = rng.standard_normal((3, 3, 1, 4))
  zero_sum = k - k.mean((0, 1), keepdims=True)
  cases = [("u ~ N(0.3, 1)", 0.3 + rng.standard_normal((4, 16, 16, 8)), k),
           ("u offset by 3 sd", 3.0 + rng.standard_normal((4, 16, 16, 8)), k),
           ("u offset by 100 sd, zero-sum k", 100.0 + rng.standard_normal((4, 16, 16, 8)),
            zero_sum)]
  op = functools.partial(dbn.d_bn_product, impl="xla")
  print("| inputs | | mean | var | du | dc | dkernel | dscale |")
  for name, u, kernel in cases:
    args = (u, c, kernel, np.ones(32), np.zeros(32))
    with jax.enable_x64(True):
      a64 = [jnp.asarray(a, jnp.float64) for a in args]
      _, m64, v64 = dbn.reference(*a64)
      g64 = jax.grad(loss_of(dbn.reference, [jnp.asarray(w) for w in weights]),
                     argnums=range(4))(*a64)
    a32 = [jnp.asarray(a, jnp.float32) for a in args]
    for label, stats in (("float32", exact), ("tf32", emulated)):
      dbn._stats_from_sums = stats
      try:
        _, m, v = op(*a32)
        g = jax.grad(loss_of(op, [jnp.asarray(w, jnp.float32) for w in weights]),
                     argnums=range(4))(*a32)
      finally:
        dbn._stats_from_sums = exact
      errs = [rel(m, m64), rel(v, v64)] + [rel(a, b) for a, b in zip(g, g64)]
      print(f"| {name if label == 'float32' else ''} | {label} | "
            + " | ".join(f"{e:.1e}" for e in errs) + " |")


def compiled():
  """Float32 tt.dots of the operation compiled for sm_90a, by inputPrecision."""
  dump = tempfile.mkdtemp(prefix="tf32_probe_")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_dump_to={dump} --xla_dump_emitter_re=triton-fusion")
  from qlhs_jax.benchmarks.aot import (GEMM_OPTIONS, compile_only_device, pallas_for_gpu,
                                       single_device_mesh)
  dev = compile_only_device()
  import jax
  import jax.numpy as jnp
  from jax.sharding import SingleDeviceSharding
  from qlhs_jax.kernels import d_bn_product as dbn
  b, h, n, e = 256, 56, 64, 4
  s = SingleDeviceSharding(dev)
  spec = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=s)

  def loss(u, c, k, scale, bias):
    p, mean, var = dbn.d_bn_product(u, c, k, scale, bias, impl="xla")
    return p.astype(jnp.float32).sum() + mean.sum() + var.sum()
  args = (spec((b, h, h, n)), spec((b, h, h, n * e)), spec((3, 3, 1, e), jnp.float32),
          spec((n * e,), jnp.float32), spec((n * e,), jnp.float32))
  with pallas_for_gpu(), jax.set_mesh(single_device_mesh(dev)):
    lowered = jax.jit(jax.grad(loss, argnums=range(5))).lower(*args)
  lowered.compile(GEMM_OPTIONS["triton"])
  counts = {}
  for path in glob.glob(os.path.join(dump, "*.ttir.txt")):
    if "before_validation" in path:
      continue
    for line in open(path):
      m = re.search(r"tt\.dot .*?(?:inputPrecision = (\w+) )?: tensor<\w+xf32>", line)
      if m:
        counts[m.group(1) or "ieee"] = counts.get(m.group(1) or "ieee", 0) + 1
  print(f"float32 tt.dots by inputPrecision (stage-1 block, batch 256): {counts or 'none'}"
        f" (Triton IR in {dump})")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--compiled", action="store_true")
  (compiled if parser.parse_args().compiled else error_table)()
