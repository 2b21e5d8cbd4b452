"""Does XLA fuse independent small kernels side by side? Compiled for an H100, no GPU.

  python benchmarks/horizontal_fusion_probe.py

The train step's non-finite guard reduced each gradient leaf on its own, and the
optimizer updates each leaf on its own: ~100 and ~100 kernels of a few microseconds a
step (benchmarks/NOTES.md, experiment 28). XLA's GPU compiler used to merge such
independent kernels into one ("horizontal fusion": same-shape loop fusions into one loop,
small reductions into one sliced kernel). This compiles, for the H100 target of
`qlhs_jax.benchmarks.aot`, 16 float32 leaves of 256 values (as a block's BatchNorm
scales are) five ways and prints the kernels of each:
- the guard as it was: all(isfinite) of each leaf, then of the 16 flags;
- the guard as `steps._all_finite` forms it: the leaves grouped by last dimension and
  dtype, one reduction per group;
- the optimizer's update, p - lr * (g + 0.9 m) and m' = 0.9 m + g, kept only where the
  guard holds, with p and m donated as the train step donated its state;
- the same update kept by `steps.keep_where` (leaves of one size, 4 at a time,
  concatenated, selected once, sliced back), p and m not donated, as the train step
  does since experiment 33; and donated.
It also asks for the debug option `xla_gpu_use_horizontal_fusion`.

Result, 2026-12-05 (jax 0.11.2, Python 3.12, this project's 2-core CPU): the per-leaf
guard compiles to 17 kernels (16 reductions, 1 for the flags), the grouped one to 1,
the updates to 16: nothing is merged side by side, same shapes included, and the option
is unknown to this XLA (the name survives only among DebugOptions' reserved fields). So
the step merges by hand where it can: the guard's leaves are concatenated per group.

Experiment 33 (2026-12-05, the same setup): the update kept by `keep_where` compiles to
4 kernels when the state is not donated, one for each group of 4 leaves, writing its
leaves' p and m; and to 36 when it is: XLA writes new buffers, then copies each of the
32 leaves back into its donated one.

Run with the GPU machine's JAX (0.11.2, `pip install "jax[cuda12]==0.11.2"`).
"""

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qlhs_jax import steps  # noqa: E402
from qlhs_jax.benchmarks import aot, hlo_bytes  # noqa: E402

LEAVES, SIZE = 16, 256


def main():
  device = aot.compile_only_device()
  import jax
  import jax.numpy as jnp
  from jax.sharding import SingleDeviceSharding

  sharding = SingleDeviceSharding(device)
  leaves = [jax.ShapeDtypeStruct((SIZE,), jnp.float32, sharding=sharding)] * LEAVES
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding)
  flag = jax.ShapeDtypeStruct((), jnp.bool_, sharding=sharding)

  def per_leaf_guard(gs):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in gs]))

  def update(ps, ms, gs, lr, finite, grouped=False):
    new_m = [0.9 * m + g for m, g in zip(ms, gs)]
    new_p = [p - lr * (g + 0.9 * m) for p, g, m in zip(ps, gs, new_m)]
    return steps.keep_where(finite, (new_p, new_m), (ps, ms), grouped=grouped)

  grouped = functools.partial(update, grouped=True)
  state_args = (leaves, leaves, leaves, scalar, flag)

  cases = {
      "guard, one reduction per leaf": (jax.jit(per_leaf_guard), (leaves,)),
      "guard, steps._all_finite": (jax.jit(steps._all_finite), (leaves,)),
      "update per leaf, state donated": (jax.jit(update, donate_argnums=(0, 1)),
                                         state_args),
      "update, keep_where, not donated": (jax.jit(grouped), state_args),
      "update, keep_where, donated": (jax.jit(grouped, donate_argnums=(0, 1)), state_args),
  }
  print(f"jax {jax.__version__}; {LEAVES} float32 leaves of {SIZE}, compiled for an H100")
  for name, (fn, args) in cases.items():
    rows = hlo_bytes.analyse(fn.lower(*args).compile(aot.GEMM_OPTIONS["triton"]).as_text())
    print(f"  {name:34s} {len(rows):3d} kernels")
  try:
    jax.jit(per_leaf_guard).lower(leaves).compile({"xla_gpu_use_horizontal_fusion": True})
    print("  xla_gpu_use_horizontal_fusion: accepted")
  except Exception as e:  # this XLA does not know it
    print(f"  xla_gpu_use_horizontal_fusion: {str(e).splitlines()[0][:100]}")


if __name__ == "__main__":
  main()
