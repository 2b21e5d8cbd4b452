r"""Eq.(3) rows of Table 1: ``A( BN(D u) * (C u) )``, ImageNet-100, 50 epochs, 224 px.

  python -m qlhs_jax.main --config=configs/eq3.py:VARIANT --workdir=$HOME/runs/eq3_VARIANT

VARIANT (default softball_ds) and the paper's top-1 (Table 1, 50 epochs):
  relu_all             82.06   8.61M params
  hardtanh_ds          82.34   8.61M
  hardball_ds          83.50   8.61M
  softball_ds          83.66   8.61M
  nows_softball_ds     84.24   8.73M   (per-channel 3x3 kernels)
  nows_x6_softball_ds  84.58   13.0M   (expansion 6)
Append ``,quickstart`` (e.g. ``configs/eq3.py:hardball_ds,quickstart``) for the
embedded-digits laptop version, and ``,dot_forms`` (below) for the opt-in kernels.

Hardware: one H100 80GB, batch 256, bfloat16. Expected time: ImageNet-100 has ~126.7k
training images, so 50 epochs are 6.3M images: ~18 minutes of GPU compute at the
harness's 5.7k img/s for softball_ds (README, Speed; H100; ~14 minutes at the 7.6k
of an H200), if the host keeps up; one
16-core host decodes ~2k img/s with the recipe's augmentation (README, Data), which
makes it ~55 minutes. Not yet run end to end here: expect the paper's top-1 above.

``model_overrides.fuse_d_bn="auto"`` (set here): on NVIDIA GPUs each block's
``BN(D u) * (C u)`` runs as fuse_d_bn="xla" with its reductions as Pallas kernels
(qlhs_jax.kernels.stencil): 5,771 img/s on the H100 against the plain path's 4,489 and
ResNet50's 5,493, at 7.6 GB peak against 12.8 (benchmarks/NOTES.md experiment 13).
On several GPUs the kernels run on each GPU's slice of the batch (per-replica
BatchNorm, the default; with ``--config.sync_bn=True`` the plain path runs); not yet
timed there (README, Speed, "Several GPUs").
Elsewhere (TPUs, CPUs; nows_x6, whose expansion 6 the kernels' block shapes cannot
take) it is the plain autodiff path,
``fuse_d_bn=none``, which ``--config.model_overrides.fuse_d_bn=none`` also forces. The
same network and variables either way (tests/models/test_fuse_d_bn.py).
On one GPU, ``--config.model_overrides.fuse_d_bn=pallas`` trains the same network
through fused D+BN+product kernels: 5,555 img/s on the H100 (README, Speed).
``--config.model_overrides.fuse_d_bn=block`` (one GPU) also runs both 1x1 maps of every
block inside Pallas kernels: 0.28x ResNet50's bytes per step and 2.4 GB peak, but 2,109
img/s on the H100 (NOTES.md experiments 8-13). Add
``--config.model_overrides.block_max_width=128`` to keep the kernels to stages 1-2
(0.37x ResNet50's bytes). The kernels' on-chip weight re-reads grow as n^3, and
``python -m qlhs_jax.benchmarks.block_tune`` picks the width on the GPU (NOTES.md
experiment 9).

``configs/eq3.py:softball_ds,dot_forms`` (one NVIDIA GPU; not yet timed): the opt-in
matrix-product kernels of NOTES.md experiments 40-54, stacked
(``qlhs_jax.kernels.settings.DOT_FORMS`` in config.kernels): D u, BatchNorm's sums and
the products on the tensor cores; c = C u and dp = dy A^T made inside the kernels,
never stored; C's and A's gradients summed in pass 4; u's gradient summed in du's
kernel (the shortcut's share and C's); y = p @ A made in the forward product's kernel,
p never stored (stages 1-2); every tap copied through L1. The same
network and variables, up to rounding: D's kernel is rounded to bfloat16 as the plain
path rounds it, and c, dp and y are rounded as the stored ones but summed in another
order (README, Variants). Compiled for one H100 without one (benchmarks.aot): 38.1 GB a
step against the default's 65.2, peak 3.3 GB against 8.3.
``benchmarks/gpu_h100.sh dot_forms`` times it against the default and ResNet50;
whichever wins becomes the default. A run may switch between the two when it resumes
(config.kernels are runtime keys).
"""

from qlhs_jax import config as qconfig

VARIANTS = {v: f"eq3_{v}" for v in ("relu_all", "hardtanh_ds", "hardball_ds",
                                      "softball_ds", "nows_softball_ds",
                                      "nows_x6_softball_ds")}


def get_config(arg=None):
  model, options = qconfig.parse_arg(arg, VARIANTS, "softball_ds", qconfig.FUSED_OPTIONS)
  c = qconfig.base_config(model)
  # The fastest path where it runs (NVIDIA GPUs), the plain path elsewhere: see above.
  c.model_overrides.fuse_d_bn = "auto"
  return qconfig.apply_options(c, options)
