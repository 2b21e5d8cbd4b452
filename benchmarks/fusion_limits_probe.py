"""What XLA will not fuse around BatchNorm's per-channel arithmetic. Compiled for an H100,
no GPU.

  python benchmarks/fusion_limits_probe.py

The step's smallest kernels are BatchNorm's: after each statistic's reduction (two
passes, XLA splits a large one), a kernel of a few microseconds computes the per-channel
mul and add from the sums, and the element-wise kernel that applies them reads them
(benchmarks/NOTES.md, experiment 34). This compiles, for the H100 target of
`qlhs_jax.benchmarks.aot`, the patterns that could merge them, and prints each one's
kernels:
- a reduction of partial sums (k, C) followed by the per-channel arithmetic, by rsqrt
  alone, and by a multiply with another operand;
- the per-channel arithmetic from given sums, then applied to a (M, C) tensor;
- partial sums (k, 2, C) summed over k inside the per-channel kernel, for k = 4, 8, 32;
- BatchNorm's statistics and their application as XLA splits them, and split by hand
  into k partial sums first (k = 8, 64, 896);
- a per-channel affine (and the forward product's stencil) before a matmul, whether XLA
  takes it into the Triton GEMM's operand.

Result, 2026-12-05 (jax 0.11.2, Python 3.12, this project's 2-core CPU): XLA fuses into
a reduction only an epilogue of one-operand operations (rsqrt alone: 1 kernel; a
multiply by a parameter, or the per-channel arithmetic: 2); its source says so
(`IsProducerConsumerFusible`: "Reductions from/to continuous dims epilogue not
fusible" unless every instruction has one operand). It fuses no per-channel producer
into the tensor-sized kernel that broadcasts it (2 kernels either way), sums partial sums
of up to 8 rows inside the per-channel kernel but not 32, and no split of the
statistics by hand does better than its own (4 kernels; by hand 4, 6 and 5). No
element-wise prologue goes into a Triton GEMM (2 kernels, also with
xla_gpu_triton_gemm_any). So the
per-channel kernels stay while XLA computes the statistics; only a hand-written kernel
that takes the sums could absorb them.

Run with the GPU machine's JAX (0.11.2, `pip install "jax[cuda12]==0.11.2"`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qlhs_jax.benchmarks import aot, hlo_bytes  # noqa: E402
from qlhs_jax.models.common import sums_and_squares  # noqa: E402

C, M = 64, 256 * 56 * 56  # a stage-1 BatchNorm at batch 256


def main():
  device = aot.compile_only_device()
  import jax
  import jax.numpy as jnp
  from jax import lax
  from jax.sharding import SingleDeviceSharding

  sharding = SingleDeviceSharding(device)
  s = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  vec = s((C,))
  x = s((M, C), jnp.bfloat16)

  def affine(s1, s2, g, b, n=1000.0):
    mean = s1 / n
    var = jnp.maximum(s2 / n - mean * mean, 0.0)
    mul = lax.rsqrt(var + 1e-5) * g
    return mul, b - mean * mul

  def apply(x, mul, add):
    return (x.astype(jnp.float32) * mul + add).astype(jnp.bfloat16)

  def split_stats(k):
    def f(x, g, b):
      xf = x.astype(jnp.float32).reshape(k, M // k, C)
      p1, p2 = sums_and_squares(xf, (1,))
      mul, add = affine(p1.sum(0), p2.sum(0), g, b, M)
      return apply(xf.reshape(M, C), mul, add)
    return f

  def xla_stats(x, g, b):
    s1, s2 = sums_and_squares(x.astype(jnp.float32), (0,))
    return apply(x, *affine(s1, s2, g, b, M))

  def stencil_product(u, c, k9, mul, add):  # the forward product of a stage-1 block
    up = jnp.pad(u, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(jnp.float32)
    du = sum(up[:, dy:dy + 56, dx:dx + 56, :, None] * k9[3 * dy + dx]
             for dy in range(3) for dx in range(3))
    return ((du.reshape(c.shape) * mul + add) * c.astype(jnp.float32)).astype(jnp.bfloat16)

  u, c = s((32, 56, 56, C), jnp.bfloat16), s((32, 56, 56, 4 * C), jnp.bfloat16)
  hidden, w = s((4 * C,)), s((4 * C, C), jnp.bfloat16)
  cases = {
      "partial sums (400, C), then mul and add": (
          lambda p, g, b: affine(p.sum(0), p.sum(0) * 2, g, b), (s((400, C)), vec, vec)),
      "partial sums (400, C), then rsqrt alone": (
          lambda p: lax.rsqrt(p.sum(0)), (s((400, C)),)),
      "partial sums (400, C), then times a parameter": (
          lambda p, g: p.sum(0) * g, (s((400, C)), vec)),
      "mul and add from sums, applied to (M, C)": (
          lambda x, s1, s2, g, b: apply(x, *affine(s1, s2, g, b)), (x, vec, vec, vec, vec)),
      **{f"partial sums (k={k}, 2, C) summed in the per-channel kernel, applied": (
          lambda x, p, g, b: apply(x, *affine(p.sum(0)[0], p.sum(0)[1], g, b)),
          (x, s((k, 2, C)), vec, vec)) for k in (4, 8, 32)},
      "BatchNorm as XLA splits its statistics": (xla_stats, (x, vec, vec)),
      **{f"BatchNorm, statistics split by hand, k={k}": (split_stats(k), (x, vec, vec))
         for k in (8, 64, 896)},
      "per-channel affine of c, then a matmul": (
          lambda c, mul, add, w: jnp.einsum(
              "bhwc,cd->bhwd", (c.astype(jnp.float32) * mul + add).astype(jnp.bfloat16), w),
          (c, hidden, hidden, w)),
      "the forward product, then a matmul": (
          lambda u, c, k9, mul, add, w: jnp.einsum(
              "bhwc,cd->bhwd", stencil_product(u, c, k9, mul, add), w),
          (u, c, s((9, 4)), hidden, hidden, w)),
  }
  print(f"jax {jax.__version__}; compiled for an H100")
  for name, (fn, args) in cases.items():
    rows = hlo_bytes.analyse(
        jax.jit(fn).lower(*args).compile(aot.GEMM_OPTIONS["triton"]).as_text())
    print(f"  {len(rows)} kernels  {name}: {', '.join(r[3] for r in rows)}")


if __name__ == "__main__":
  main()
