"""BatchNorm's statistics after a matmul: two reductions or one? Compiled for an H100, no GPU.

  python benchmarks/bn_stats_probe.py

A stage-1 matmul (batch 256, 56x56, 64 -> 64 channels, bfloat16) followed by training-mode
normalisation, compiled for the H100 target of `qlhs_jax.benchmarks.aot`, its bytes per
kernel counted by `hlo_bytes`, forward alone and forward with backward, for three ways
to sum x and x * x:
- "two": two sums, as `models.common.BatchNorm` wrote them before 2026-12-03;
- "variadic": one `lax.reduce` with two outputs, differentiated by JAX;
- "custom_jvp": the same reduce with its derivative written out, which is
  `models.common.sums_and_squares`, the default since.

Result, 2026-12-03 (jax 0.11.2, Python 3.12, this project's 2-core CPU), GB per call:
- forward: two 0.617, variadic 0.514, custom_jvp 0.514;
- forward and backward: two 1.148, variadic 1.358, custom_jvp 1.045.

"two" reads x twice (two 0.103 GB reductions). JAX's own derivative of the variadic
reduce compiles to slices and adds. benchmarks/NOTES.md, experiment 15.

Run with the GPU machine's JAX (0.11.2, `pip install "jax[cuda12]==0.11.2"`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qlhs_jax.benchmarks import aot, hlo_bytes  # noqa: E402
from qlhs_jax.models.common import sums_and_squares  # noqa: E402


def main():
  dev = aot.compile_only_device()
  import jax
  import jax.numpy as jnp
  from jax import lax
  from jax.sharding import SingleDeviceSharding
  f32, axes = jnp.float32, (0, 1, 2)

  def variadic(y):
    return lax.reduce((y, y * y), (f32(0), f32(0)),
                      lambda a, b: (a[0] + b[0], a[1] + b[1]), axes)

  sums = {"two": lambda y: (jnp.sum(y, axes), jnp.sum(y * y, axes)),
          "variadic": variadic,
          "custom_jvp": lambda y: sums_and_squares(y, axes)}

  def normalised(moments):
    def f(x, w):
      y = (x @ w).astype(f32)
      s, q = moments(y)
      n = y.size // y.shape[-1]
      mean = s / n
      return ((y - mean) * lax.rsqrt(q / n - mean * mean + 1e-5)).astype(jnp.bfloat16)
    return f

  place = SingleDeviceSharding(dev)
  x = jax.ShapeDtypeStruct((256, 56, 56, 64), jnp.bfloat16, sharding=place)
  w = jax.ShapeDtypeStruct((64, 64), jnp.bfloat16, sharding=place)
  print(f"{'sums':12s} {'pass':22s} {'kernels':>8s} {'GB':>7s}  kernels over 1 MB")
  for name, moments in sums.items():
    f = normalised(moments)
    both = jax.grad(lambda x, w: jnp.sum(f(x, w).astype(f32) ** 2), argnums=(0, 1))
    for label, fn in (("forward", f), ("forward and backward", both)):
      rows = hlo_bytes.analyse(jax.jit(fn).lower(x, w).compile().as_text())
      big = ", ".join(f"{r[3]} {r[0] / 1e9:.3f}" for r in rows if r[0] > 1e6)
      print(f"{name:12s} {label:22s} {len(rows):8d} {sum(r[0] for r in rows) / 1e9:7.3f}"
            f"  {big}")


if __name__ == "__main__":
  main()
