r"""Eq.(5): each channel times its own derivatives, no ``A``; ImageNet-100, 50 epochs, 224 px.

  python -m qlhs_jax.main --config=configs/eq5.py --workdir=$HOME/runs/eq5

Paper (Table 1): top-1 78.64, 4.26M parameters.
``configs/eq5.py:quickstart`` is the embedded-digits laptop version; ``,dot_forms``
(below) runs the opt-in kernels.

Hardware: one H100 80GB, batch 256, bfloat16; about the time of Eq.(3) (configs/eq3.py),
scaled by the harness's step rate of this model (python -m qlhs_jax.benchmarks.step
--model eq5_softball_ds); not yet run end to end here.
Expected: the paper's top-1 above.

``model_overrides.fuse_d_bn="auto"`` (set here), as in configs/eq3.py: on NVIDIA GPUs
each block's ``BN(D u) * (C u)`` runs as fuse_d_bn="xla" with the stencil kernels, the
plain path elsewhere; the same network and variables (tests/models/test_fuse_d_bn.py).
Not yet timed for Eq.(5): compiled for one H100 without one (benchmarks.aot, 2a74f85),
its step moves 59.3 GB against the plain path's 81.7, peak 5.5 GB against 10.4
(benchmarks/NOTES.md, experiment 15).

``configs/eq5.py:softball_ds,dot_forms`` (one NVIDIA GPU; not yet timed): the opt-in
kernels stacked, as in configs/eq3.py. Eq.(5) has no ``A``: of what they make inside
the kernels only c = C u applies (never stored); there is no dp to make, and C's
gradient stays XLA's matmul; u's gradient is summed in du's kernel; no A to apply in
the product's kernel. Compiled for one
H100 without one: 47.9 GB a step against the default's 54.2, peak 2.6 GB against 5.7
(benchmarks.aot, jax 0.11.2).
"""

from qlhs_jax import config as qconfig


def get_config(arg=None):
  model, options = qconfig.parse_arg(arg, {"softball_ds": "eq5_softball_ds"},
                                     "softball_ds", qconfig.FUSED_OPTIONS)
  c = qconfig.base_config(model)
  c.model_overrides.fuse_d_bn = "auto"  # the kernels where they run: see above
  return qconfig.apply_options(c, options)
