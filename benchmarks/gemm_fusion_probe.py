"""Does XLA fuse a hidden-size operand into a stage-1 matmul? Compiled for an H100, no GPU.

  python benchmarks/gemm_fusion_probe.py [XLA_FLAG ...]

The `fuse_d_bn="xla"` stage-1 block moves 8.6 GB per step (benchmarks/NOTES.md,
experiments 5-7). What is left above a hand count of the ideal is the hidden tensors that
sit between a matmul and its element-wise neighbour: q = C u is stored and read back to
form p = BN(D u) * q; p is stored and read by A p and by dA; dq = dp * BN(D u) is stored
and read by C^T dq and dC. That traffic goes only if the matmul kernel computes the
product itself, as an epilogue (on its output) or a prologue (on its operand). This
compiles each pattern alone at stage-1 size (batch 256, 56x56, n = 64, e = 4, bfloat16)
for the H100 target of `qlhs_jax.benchmarks.aot` (Triton GEMM fusions, default tilings)
and prints the bytes per kernel (`hlo_bytes`): one `gemm_fusion` kernel means XLA fused
the pattern. Each XLA_FLAG named on the command line (a boolean debug option, e.g.
xla_gpu_experimental_enable_triton_heroless_priority_fusion) is tried on its own as well.

Result, 2026-11-27 (jax 0.11.2, Python 3.12, this project's 2-core CPU): only the
per-channel scale fuses (0.514 GB, one kernel). Every pattern with a second hidden-size
tensor, a stencil of u or not, stays a separate element-wise kernel plus the matmul; so
does A (q * q), an operand made from one stored tensor (1.336 GB: 0.822 for q*q, 0.514
for the matmul). The same with the default options and with each of
xla_gpu_experimental_all_fusions_with_triton,
xla_gpu_experimental_enable_triton_heroless_priority_fusion (which makes the BN(D u)
patterns worse: 3.4 GB more),
xla_gpu_unsupported_enable_triton_multi_output_fusion, xla_gpu_triton_gemm_any and
xla_gpu_experimental_enable_fusion_block_level_rewriter. So 8.6 GB is the floor of a
stage-1 block that XLA compiles; going lower takes a kernel that does the matmul and the
product together (the Pallas path's territory).

Run with the GPU machine's JAX (0.11.2, `pip install "jax[cuda12]==0.11.2"`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qlhs_jax.benchmarks import aot, hlo_bytes  # noqa: E402
from qlhs_jax.kernels.d_bn_product import _d_xla  # noqa: E402  the "xla" path's own D u

B, H, W, N, E = 256, 56, 56, 64, 4


def main(flags):
  device = aot.compile_only_device()
  import jax
  import jax.numpy as jnp
  from jax.sharding import SingleDeviceSharding
  bf, f32 = jnp.bfloat16, jnp.float32

  def bn_d(u, k9, a, b):  # BN(D u) as the "xla" path forms it: D u in float32 from u
    return (_d_xla(u, k9, 1) * a.reshape(N, E) + b.reshape(N, E)).reshape(B, H, W, N * E)

  def c_u(u, c):
    return jnp.einsum("bhwn,nm->bhwm", u, c, preferred_element_type=f32)

  cases = {
      "epilogue: (C u) * per-channel scale":
          lambda u, q, k9, a, b, c, A: (c_u(u, c) * a).astype(bf),
      "epilogue: (C u) * hidden tensor":
          lambda u, q, k9, a, b, c, A: (c_u(u, c) * q).astype(bf),
      "epilogue: (C u) * BN(D u)":
          lambda u, q, k9, a, b, c, A: (c_u(u, c) * bn_d(u, k9, a, b)).astype(bf),
      "prologue: A (q * hidden tensor)":
          lambda u, q, k9, a, b, c, A: jnp.einsum("bhwm,mn->bhwn", q * q, A),
      "prologue: A (q * BN(D u))":
          lambda u, q, k9, a, b, c, A: jnp.einsum(
              "bhwm,mn->bhwn", (q * bn_d(u, k9, a, b)).astype(bf), A),
      "prologue: (q * BN(D u))^T u (dC)":
          lambda u, q, k9, a, b, c, A: jnp.einsum(
              "bhwm,bhwn->mn", (q * bn_d(u, k9, a, b)).astype(bf), u),
  }
  sharding = SingleDeviceSharding(device)
  spec = lambda shape, dt=bf: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  args = (spec((B, H, W, N)), spec((B, H, W, N * E)), spec((9, N, E), f32),
          spec((N * E,), f32), spec((N * E,), f32), spec((N, N * E)), spec((N * E, N)))
  print(f"jax {jax.__version__}; kernels moving over 1 MB, GB each; one gemm_fusion "
        f"kernel = fused")
  for label, options in [("default", {}), *[(f, {f: True}) for f in flags]]:
    print(f"== {label}")
    for name, fn in cases.items():
      try:
        compiled = jax.jit(fn).lower(*args).compile({**aot.GEMM_OPTIONS["triton"],
                                                     **options})
      except Exception as e:  # an unknown or unsupported flag: say so, go on
        print(f"  {name:36s} does not compile: {str(e).splitlines()[0][:120]}")
        continue
      rows = hlo_bytes.analyse(compiled.as_text())
      big = ", ".join(f"{r[3]} {r[0] / 1e9:.3f}" for r in rows if r[0] > 1e6)
      print(f"  {name:36s} {sum(r[0] for r in rows) / 1e9:6.3f} GB  ({big})")


if __name__ == "__main__":
  main(sys.argv[1:])
