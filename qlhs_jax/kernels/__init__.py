"""Hand-written operations for speed; the modules are the public names:
:mod:`qlhs_jax.kernels.d_bn_product` (``BN(D u) * c`` with its own backward)."""
