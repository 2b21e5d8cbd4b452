"""Which kernel forms and tiles the traced code uses: ``config.kernels``, else QLHS_*.

Every variant of the D + BatchNorm + product passes and of training BatchNorm's
reduction (benchmarks/NOTES.md) has a key in ``config.kernels``. An empty key (the
default) falls back on the environment variable of the same meaning, which the
benchmark harnesses and ``benchmarks/gpu_h100.sh`` set, and an unset variable on the
built-in default ("auto" for the stencil forms). The readers (``d_bn_product``,
``stencil``, ``eq3_block``, ``models.common``) call :func:`get` at trace time;
``train.train_and_evaluate`` traces under :func:`use` with the run's ``config.kernels``,
and the run's config.json records them. The variants compute the same values up to
rounding (each is tested against XLA's form; ``d_kernel="compute"`` rounds D's kernel to
the compute dtype, as the plain path does), so the keys may change when a run resumes
(``config.RUNTIME_KEYS``), as the device may.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Mapping

# config.kernels key -> the environment variable it stands for.
VARIABLES = {
    "stats_form": "QLHS_STATS_FORM",      # the statistics' tap sums and Gram matrix
    "sums_form": "QLHS_SUMS_FORM",        # pass 3's sums of impl "xla"
    "du_form": "QLHS_DU_FORM",            # du = D^T dx
    "product_form": "QLHS_PRODUCT_FORM",  # the forward product and pass 4 (dx, dc)
    "dc_pass": "QLHS_DC_PASS",            # where dc = dp * BN(D u) is computed
    "d_kernel": "QLHS_D_KERNEL",          # D's kernel in float32 or the compute dtype
    "d_taps": "QLHS_D_TAPS",              # where the XLA passes read u's nine taps
    "c_form": "QLHS_C_FORM",              # whether c = C u is stored or made in kernels
    "dp_form": "QLHS_DP_FORM",            # whether dp = dy A^T is stored or made in kernels
    "weight_grads": "QLHS_WEIGHT_GRADS",  # where C's and A's gradients are summed
    "du_sum": "QLHS_DU_SUM",              # where du's shares (D^T dx, C's, shortcut's) add
    "p_form": "QLHS_P_FORM",              # whether p is stored or A applied in its kernel
    "bn_stats": "QLHS_BN_STATS",          # training BatchNorm's sums of x and x * x
    "stem_grad": "QLHS_STEM_GRAD",        # the stem's dL/dy (stem_pool="argmax_bn")
    "stem_taps": "QLHS_STEM_TAPS",        # where the stem's pool reads its taps
    "stencil_grid": "QLHS_STENCIL_GRID",  # the stencil kernels' grid order
    "stencil_rows": "QLHS_STENCIL_ROWS",  # the stencil kernels that walk rows
    "tap_copy": "QLHS_TAP_COPY",          # the dot forms' tap copies: widest, or via L1
    "stencil_tiling": "QLHS_STENCIL_TILING",
    "pallas_tiling": "QLHS_PALLAS_TILING",  # fuse_d_bn="pallas"
    "block_tiling": "QLHS_BLOCK_TILING",    # fuse_d_bn="block"
}
_KEY = {var: key for key, var in VARIABLES.items()}

# The opt-in matrix-product kernels of benchmarks/NOTES.md experiments 40-54, stacked, as
# config.kernels keys: the statistics' lags, pass 3's sums, the forward product and pass
# 4 as products, D's kernel rounded to the compute dtype (one part of it a product), c
# made inside the kernels at stages 1-3, dp at stages 1-2, C's and A's gradients summed
# in pass 4, u's gradient summed in du's kernel (C's share and the shortcut's), A
# applied in the forward product's kernel where pass 4 sums its gradient (p never
# stored), and u's taps copied through L1 (27.1 GB a step read from L2, not 39.0;
# experiment 54).
# Deviceless (benchmarks.aot, jax 0.11.2, Eq.(3) at batch 256 for an H100): 38.1 GB a
# step and a 3.3 GB peak estimate, against the default's 65.2 and 8.3. Not yet timed
# on a GPU (``benchmarks/gpu_h100.sh dot_forms`` times it; its last row sets these).
# The configs' ``dot_forms`` option (configs/eq3.py) trains with them.
DOT_FORMS = {"stats_form": "pallas_dot", "sums_form": "pallas_dot",
             "product_form": "pallas_dot", "d_kernel": "compute", "c_form": "kernels_wide",
             "dp_form": "kernels", "weight_grads": "pass4", "du_sum": "kernel",
             "p_form": "kernels", "tap_copy": "l1"}

# The values config.kernels sets, by variable, in the code being traced now.
_FROM_CONFIG: contextvars.ContextVar[dict] = contextvars.ContextVar(
    "qlhs_kernel_settings", default={})


def default_config() -> dict:
  """``config.kernels``: every key empty (the variable, else the built-in default)."""
  return {key: "" for key in VARIABLES}


def get(var: str) -> str:
  """The value of ``var`` (one of :data:`VARIABLES`' variables) for the code being
  traced: config.kernels' key inside :func:`use`, else the environment; "" if neither
  sets it."""
  if var not in _KEY:
    raise KeyError(f"{var} is not a kernel setting; the settings are {sorted(_KEY)}")
  return _FROM_CONFIG.get().get(var) or os.environ.get(var, "")


def choice(var: str, choices: tuple[str, ...]) -> str:
  """:func:`get`'s value of ``var``, else ``choices[0]`` (the built-in default); a value
  not in ``choices`` is refused, naming where it came from (:func:`name`) and the
  choices."""
  value = get(var) or choices[0]
  if value not in choices:
    raise ValueError(f"{name(var)}={value!r}: choose one of {choices} "
                     f"(unset: {choices[0]})")
  return value


def chosen() -> dict[str, str]:
  """Every setting :func:`get` gives a value now, by config.kernels key; a setting left
  empty (the readers' built-in default) is left out."""
  return {key: value for key, var in VARIABLES.items() if (value := get(var))}


def name(var: str) -> str:
  """Where :func:`get`'s value of ``var`` comes from, for error messages:
  ``config.kernels.KEY`` or the variable itself."""
  return f"config.kernels.{_KEY[var]}" if _FROM_CONFIG.get().get(var) else var


@contextlib.contextmanager
def use(kernels: Mapping[str, str]) -> Iterator[None]:
  """Traces the enclosed code with ``kernels`` (a config.kernels mapping; empty values
  fall back on the environment). A key and its variable that disagree are refused:
  one of the two would be silently ignored."""
  unknown = sorted(set(kernels) - set(VARIABLES))
  if unknown:
    raise ValueError(f"config.kernels has no key(s) {unknown}; the keys are "
                     f"{sorted(VARIABLES)}")
  chosen = {VARIABLES[k]: str(v) for k, v in kernels.items() if v}
  clashes = [f"config.kernels.{_KEY[var]}={value!r} but {var}={os.environ[var]!r}"
             for var, value in chosen.items()
             if (os.environ.get(var) or value) != value]  # set empty is unset, as in get
  if clashes:
    raise ValueError(f"{'; '.join(clashes)} in the environment: unset the variable, or "
                     f"make it agree with the config")
  token = _FROM_CONFIG.set(chosen)
  try:
    yield
  finally:
    _FROM_CONFIG.reset(token)


def check(kernels: Mapping[str, str]) -> None:
  """Raises ValueError, naming the key (or variable) and its choices, for any setting
  that the readers would refuse at trace time."""
  # Imported here: these modules import this one.
  from qlhs_jax.kernels import d_bn_product, eq3_block, stencil
  from qlhs_jax.models import common
  with use(kernels):
    d_bn_product.stats_form()
    d_bn_product.sums_form()
    d_bn_product.du_form()
    d_bn_product.product_form()
    d_bn_product.dc_pass()
    d_bn_product.d_kernel()
    d_bn_product.c_form()
    d_bn_product.dp_form()
    d_bn_product.weight_grads()
    d_bn_product.du_sum()
    d_bn_product.p_form()
    choice("QLHS_D_TAPS", d_bn_product.D_TAPS_FORMS)  # d_taps() would start a backend
    d_bn_product.tiling()
    common.bn_stats_form()
    common.stem_grad_form()
    common.stem_taps_form()
    stencil.grid_order()
    stencil.rows_kernels()
    stencil.tiling("stats")
    stencil.tap_copy()
    eq3_block.tiling()
