r"""Not in the paper: Eq.(3) with a 1x1 mixing ``W`` in front of ``D``,
``A( BN(D(W u)) * (C u) )``: the block form for which the claimed stream symmetry holds
exactly (O(n) per stage with softball, GL(n) with no activation; README, Symmetry).

  python -m qlhs_jax.main --config=configs/eq3w.py:softball_ds --workdir=$HOME/runs/eq3w

VARIANT: softball_ds (default) or none. 9.61M parameters (W adds n^2 per block).
Append ``,quickstart`` for the embedded-digits version, ``,dot_forms`` (below) for the
opt-in kernels. Hardware: one H100, batch 256, bfloat16. Expected time: that of
configs/eq3.py plus ~13% (1.84 vs 1.64 GMACs); no paper figure to compare with (README,
Symmetry, gives the quickstart accuracy).

``model_overrides.fuse_d_bn="auto"`` (set here), as in configs/eq3.py: on NVIDIA GPUs
``BN(D(W u)) * (C u)`` runs as fuse_d_bn="xla" with the stencil kernels, the plain path
elsewhere; the same network and variables (tests/models/test_fuse_d_bn.py). Not yet
timed: compiled for one H100 without one (benchmarks.aot, 2a74f85), softball_ds's
step moves 75.4 GB against the plain path's 105.0, peak 8.8 GB against 11.0
(benchmarks/NOTES.md, experiment 15).

``configs/eq3w.py:softball_ds,dot_forms`` (one NVIDIA GPU; not yet timed): the opt-in
kernels stacked, as in configs/eq3.py. Here C reads u, not D's input W u, so c stays
stored and C's and A's gradients XLA's (so p is kept, and A stays XLA's matmul), and
u's gradient is XLA's sum; dp = dy A^T is made inside the kernels (never stored).
Compiled for one H100 without one: 66.9 GB a step against the default's 74.8, peak 8.3
GB against 9.4 (benchmarks.aot, jax 0.11.2).
"""

from qlhs_jax import config as qconfig


def get_config(arg=None):
  model, options = qconfig.parse_arg(arg, {"softball_ds": "eq3w_softball_ds",
                                           "none": "eq3w_none"}, "softball_ds",
                                     qconfig.FUSED_OPTIONS)
  c = qconfig.base_config(model)
  c.model_overrides.fuse_d_bn = "auto"  # the kernels where they run: see above
  return qconfig.apply_options(c, options)
