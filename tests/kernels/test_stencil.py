"""The stencil's Pallas kernels (qlhs_jax.kernels.stencil), interpreted on the CPU, against
float64 NumPy loops; and wired into d_bn_product, eq3_block and shifted_t by
QLHS_STATS_FORM / QLHS_SUMS_FORM / QLHS_DU_FORM, against float64 autodiff of the plain
formula."""

import functools
import json
import os
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlhs_jax.kernels import d_bn_product as dbn
from qlhs_jax.kernels import eq3_block, stencil
from qlhs_jax.models import layers
from tests.kernels.test_d_bn_product import (HAS_CUDA_PLUGIN, HAS_TRITON,
                                              bfloat16_inputs, h100_ptx_by_entry,
                                              numpy_d_transpose)

pytestmark = pytest.mark.skipif(dbn.plt is None, reason="needs jax.experimental.pallas.triton")


def numpy_taps(u, stride):
  """The nine taps of a zero-padded 3x3 stencil, (9, B, Ho, Wo, n) float64."""
  b, h, w, n = u.shape
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  up = np.pad(u, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return np.stack([up[:, dy:dy + stride * (ho - 1) + 1:stride,
                      dx:dx + stride * (wo - 1) + 1:stride]
                   for dy in range(3) for dx in range(3)])


def numpy_stats(u, stride):
  taps = numpy_taps(u, stride)
  sums = [taps[t].sum((0, 1, 2)) for t in range(9)]
  sums += [(taps[a] * taps[b]).sum((0, 1, 2)) for a in range(9) for b in range(a, 9)]
  return np.stack(sums)[:, None, :]


SHAPES = [  # (B, H, W, n), stride, tiling: odd sizes, partial tiles, channel blocks
    ((2, 6, 5, 4), 1, "stats=16,4,4,1 du=16,4,4"),
    ((3, 7, 6, 8), 2, "stats=8,4,2,3 du=8,4,2"),     # two channel blocks, 3 launches
    ((2, 9, 9, 16), 1, "stats=32,16,4,54 du=64,8,4"),  # one piece per launch
    ((1, 5, 7, 4), 2, ""),                             # the defaults; odd H and W
]


@pytest.mark.parametrize("lags", [True, False])
@pytest.mark.parametrize("shape,stride,spec", SHAPES)
def test_tap_stats_match_numpy(monkeypatch, shape, stride, spec, lags):
  """The 9 tap sums and 45 Gram entries equal float64 sums, in d_bn_product's order, and
  equal what the XLA statistics reduce: from lag products at stride 1 (``lags``) and
  from all 54 products."""
  monkeypatch.setenv("QLHS_STENCIL_TILING", spec)
  u = np.random.default_rng(0).normal(size=shape) + 0.5
  got = stencil.tap_stats(jnp.asarray(u, jnp.float32), stride, interpret=True, lags=lags)
  want = numpy_stats(u, stride)
  assert got.shape == want.shape == (54, 1, shape[-1])
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-4)
  _, _, xla = dbn._xla_stats(jnp.asarray(u, jnp.float32), jnp.zeros((9, shape[-1], 1)),
                             stride, 1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(xla), rtol=2e-5, atol=2e-4)


def numpy_lag_sums(u):
  """Float64 loops: the sum of u, then of u(y, x) u(y + dy, x + dx) for each of
  stencil.LAGS, 0 outside the image; then the border terms in stencil.lag_sums' order."""
  b, h, w, n = u.shape
  out = [u.sum((0, 1, 2))]
  for dy, dx in stencil.LAGS:
    acc = np.zeros(n)
    for y in range(h):
      for x in range(w):
        if 0 <= y + dy < h and 0 <= x + dx < w:
          acc += (u[:, y, x] * u[:, y + dy, x + dx]).sum(0)
    out.append(acc)
  strips = {"top": u[:, 0], "bottom": u[:, h - 1], "left": u[:, :, 0],
            "right": u[:, :, w - 1]}
  for side in stencil.BORDER_SIDES:
    v = strips[side]  # (B, L, n)
    out.append(v.sum((0, 1)))
    for k in range(3):
      out.append(sum((v[:, i] * v[:, i + k]).sum(0) for i in range(v.shape[1] - k))
                 if v.shape[1] > k else np.zeros(n))
    for i in (0, v.shape[1] - 1):
      out += [v[:, i].sum(0), (v[:, i] ** 2).sum(0)]
  return np.stack(out)


# Border cases of the lag form: one row, one column, two of each, an image narrower
# than the longest lag; tiles that straddle images; sides summed in pieces of m
# positions (the tiling's pixels), the last one partial (m = 4: 5 = 4 + 1; m = 2:
# 9 = 2 + 2 + 2 + 2 + 1).
LAG_SHAPES = [((2, 1, 5, 4), "stats=4,4,1,1"), ((3, 4, 1, 2), "stats=2,2,1,1"),
              ((2, 2, 2, 4), "stats=8,2,2,1"), ((1, 3, 7, 8), ""),
              ((4, 5, 3, 4), "stats=16,4,4,1"), ((2, 9, 6, 4), "stats=2,4,1,1")]


@pytest.mark.parametrize("ahead", [True, False])
@pytest.mark.parametrize("shape,spec", LAG_SHAPES)
def test_the_statistics_walk_matches_numpy(monkeypatch, shape, spec, ahead):
  """QLHS_STENCIL_ROWS=stats: the lag sums and border terms of the walk (the strip's
  width the tiling's pixels; every image in chunks of rows where the shape allows)
  equal float64 loops, with rows loaded ahead and where used."""
  monkeypatch.setattr(stencil, "ROWS_AHEAD", ahead)
  launched = _row_walks(monkeypatch, "stats", spec, 10_000 if shape[1] > 3 else None)
  u = np.random.default_rng(4).normal(size=shape) - 0.7
  full = stencil.lag_sums(jnp.asarray(u, jnp.float32), interpret=True)
  np.testing.assert_allclose(np.asarray(full), numpy_lag_sums(u), rtol=2e-5, atol=2e-5)
  assert launched == ["_lags_rows_kernel"]


@pytest.mark.parametrize("programs", [1056, 2])
@pytest.mark.parametrize("dot,piece", [(False, None), (True, None), (True, 1)])
@pytest.mark.parametrize("shape,spec", LAG_SHAPES)
def test_lag_sums_and_border_terms_match_numpy(monkeypatch, shape, spec, dot, piece,
                                               programs):
  """The lag kernel's 14 sums equal float64 loops, and with the border terms they give
  the 54 statistics of the direct float64 sums, at shapes whose border is most of the
  image (the 7x7 of stage 4 is such a shape); the lags also as matrix products
  (QLHS_STATS_FORM=pallas_dot, float32 operands here). With one image a program or
  none, and (``programs`` 2, as stage 4's 33 chunks of 256 images) two, one of them
  past the batch where the batch is odd: the element-wise form loops over them, the
  dot form lays their sides end to end, in one piece or (``piece`` 1: pieces of the
  tiling's pixels) several."""
  monkeypatch.setattr(stencil, "STATS_PROGRAMS", programs)
  if piece:
    monkeypatch.setattr(stencil, "BORDER_DOT_PIECE", piece)
  monkeypatch.setenv("QLHS_STENCIL_TILING",
                     spec.replace("stats=", "stats_dot=") if dot else spec)
  u = np.random.default_rng(3).normal(size=shape) - 0.7
  u32 = jnp.asarray(u, jnp.float32)
  full = stencil.lag_sums(u32, interpret=True, dot=dot)
  np.testing.assert_allclose(np.asarray(full), numpy_lag_sums(u), rtol=2e-5, atol=2e-5)
  got = stencil.stats_from_lags(full)
  np.testing.assert_allclose(np.asarray(got), numpy_stats(u, 1)[:, 0], rtol=2e-5,
                             atol=2e-5)


@pytest.mark.parametrize("shape,spec", LAG_SHAPES)
def test_the_dot_lags_of_bfloat16_u_are_exact_products(monkeypatch, shape, spec):
  """QLHS_STATS_FORM=pallas_dot on a bfloat16 u (training's): its products are exact and
  only the float32 sums round; to 1e-6 of the largest against float64 sums of the same
  bfloat16 values."""
  monkeypatch.setenv("QLHS_STENCIL_TILING", spec.replace("stats=", "stats_dot="))
  u = jnp.asarray(np.random.default_rng(5).normal(size=shape) - 0.7, jnp.bfloat16)
  full = np.asarray(stencil.lag_sums(u, interpret=True, dot=True))
  want = numpy_lag_sums(np.asarray(u.astype(jnp.float32), np.float64))
  assert np.abs(full - want).max() / np.abs(want).max() < 1e-6


def numpy_bn_sums(u, c5, dp5, k9, mean, rstd, stride):
  """Pass 3's sums in float64: of g = dp * c, g * xhat and tap_t(u) * g over the pixels."""
  taps = numpy_taps(u, stride)[..., None]  # (9, B, Ho, Wo, n, 1)
  g = dp5 * c5
  xhat = ((taps * k9[:, None, None, None]).sum(0) - mean[0]) * rstd[0]
  return (g.sum((0, 1, 2))[None], (g * xhat).sum((0, 1, 2))[None],
          np.moveaxis((taps * g).sum((1, 2, 3)), 0, 1)[None])


SUMS_SHAPES = [  # (B, H, W, n), stride, e, tiling
    ((2, 6, 5, 4), 1, 4, "sums=16,4,4"),
    ((3, 7, 6, 8), 2, 2, "sums=8,4,2"),    # two channel blocks, partial tiles
    ((2, 9, 9, 16), 1, 4, ""),               # the default
    ((1, 5, 8, 4), 2, 1, "sums=4,4,1"),
]


def _dot_spec(spec: str, stages: int = 2) -> str:
  """A ``sums=`` tiling as the dot form's entry (``sums_dot=``, with its stages)."""
  return spec.replace("sums=", "sums_dot=") + f",{stages}" if spec else ""


@pytest.mark.parametrize("form", ["pallas", "pallas_xhat", "pallas_dot"])
@pytest.mark.parametrize("shape,stride,e,spec", SUMS_SHAPES)
def test_bn_sums_match_numpy(monkeypatch, shape, stride, e, spec, form):
  """Pass 3's three sums equal float64 NumPy sums, and what the XLA pass reduces: from
  the taps' products with g (the default), from D u and xhat (QLHS_SUMS_FORM=
  pallas_xhat), and as matrix products over the pixels (pallas_dot; float32 operands
  here)."""
  monkeypatch.setenv("QLHS_STENCIL_TILING",
                     _dot_spec(spec) if form == "pallas_dot" else spec)
  b, h, w, n = shape
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  rng = np.random.default_rng(8)
  args = (rng.normal(size=shape) + 0.3, rng.normal(size=(b, ho, wo, n, e)),
          rng.normal(size=(b, ho, wo, n, e)), rng.normal(size=(9, n, e)),
          rng.normal(size=(1, n, e)), rng.uniform(0.5, 2.0, size=(1, n, e)))
  want = numpy_bn_sums(*args, stride)
  a32 = [jnp.asarray(a, jnp.float32) for a in args]
  got = stencil.bn_sums(*a32, stride, interpret=True, xhat=form == "pallas_xhat",
                        dot=form == "pallas_dot")
  zero = jnp.zeros((1, n, e))
  xla = dbn._xla_backward_sums(*a32[:4], zero, zero, *a32[4:], stride, 1)[1:]
  for g, x, w_ in zip(got, xla, want):
    assert g.shape == w_.shape == x.shape
    np.testing.assert_allclose(np.asarray(g), w_, rtol=2e-5, atol=2e-4)
    np.testing.assert_allclose(np.asarray(g), np.asarray(x), rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("shape,stride,e,spec", SUMS_SHAPES)
def test_the_dot_sums_of_bfloat16_inputs_are_exact_products(monkeypatch, shape, stride, e,
                                                            spec):
  """QLHS_SUMS_FORM=pallas_dot with bfloat16 u, c and dp (training's): g = dp * c goes into
  the products as two bfloat16 halves, so every product is exact and only the float32
  sums round. Against float64 sums of the same bfloat16 values to 1e-6 of the largest:
  g rounded to one bfloat16 (the low half dropped) misses by ~1e-3."""
  monkeypatch.setenv("QLHS_STENCIL_TILING", _dot_spec(spec, 3))
  b, h, w, n = shape
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  rng = np.random.default_rng(9)
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  u, c5, dp5 = (bf(rng.normal(size=shape) + 0.3), bf(rng.normal(size=(b, ho, wo, n, e))),
                bf(rng.normal(size=(b, ho, wo, n, e))))
  rest = [jnp.asarray(a, jnp.float32) for a in (
      rng.normal(size=(9, n, e)), rng.normal(size=(1, n, e)),
      rng.uniform(0.5, 2.0, size=(1, n, e)))]
  want = numpy_bn_sums(*[np.asarray(jnp.asarray(a, jnp.float32), np.float64)
                         for a in (u, c5, dp5, *rest)], stride)
  got = stencil.bn_sums(u, c5, dp5, *rest, stride, interpret=True, dot=True)
  for g, w_ in zip(got, want):
    assert g.shape == w_.shape
    err = np.abs(np.asarray(g) - w_).max() / np.abs(w_).max()
    assert err < 1e-6, err


def _du_dot_spec(spec: str, stages: int = 2) -> str:
  """A tiling's ``du=`` entry as the dot form's (``du_dot=``, with its stages)."""
  return " ".join(f"du_dot={v[3:]},{stages}" if v.startswith("du=") else v
                  for v in spec.split())


@pytest.mark.parametrize("dot", [False, True])
@pytest.mark.parametrize("shape,stride,spec", SHAPES)
@pytest.mark.parametrize("e", [1, 4])
def test_d_transpose_matches_numpy(monkeypatch, shape, stride, spec, e, dot):
  """du = D^T dx (+ two addends) equals the float64 scatter, both strides, odd sizes;
  also as matrix products (QLHS_DU_FORM=pallas_dot, float32 operands first; at stride 2
  the same parity classes' kernel)."""
  monkeypatch.setenv("QLHS_STENCIL_TILING", _du_dot_spec(spec) if dot else spec)
  b, h, w, n = shape
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  rng = np.random.default_rng(1)
  dx, k9, add, add2 = (rng.normal(size=(b, ho, wo, n, e)), rng.normal(size=(9, n, e)),
                       rng.normal(size=shape), rng.normal(size=shape))
  want = numpy_d_transpose(dx, k9, stride, h, w)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got = stencil.d_transpose(f32(dx), f32(k9), stride, (h, w), interpret=True, dot=dot)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  got = stencil.d_transpose(f32(dx).astype(jnp.bfloat16), f32(k9), stride, (h, w),
                            addends=(f32(add), f32(add2)), out_dtype=jnp.bfloat16,
                            interpret=True, dot=dot)
  want = numpy_d_transpose(np.asarray(f32(dx).astype(jnp.bfloat16), np.float64), k9,
                           stride, h, w) + add + add2
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("programs", [1056, 3])
@pytest.mark.parametrize("shape,e,spec", [((2, 6, 5, 4), 4, "du_dot=8,2,4,2"),
                                          ((2, 9, 7, 16), 4, "du_dot=16,4,4,3"),
                                          ((2, 5, 8, 8), 4, "du_dot=8,8,4,2"),
                                          ((1, 5, 8, 8), 2, "")])
def test_the_dot_du_of_bfloat16_dx_is_exact_products(monkeypatch, shape, e, spec,
                                                     programs):
  """QLHS_DU_FORM=pallas_dot with a bfloat16 dx (training's): D's kernel goes into the
  products as three bfloat16 parts that add up to it, so every product is exact and
  only the float32 sums round. Against float64 of the same bfloat16 values (and two
  addends, float32 and bfloat16) to 1e-6 of the largest, with one tile a program and
  with chunks of several (``programs`` 3: at 10 tiles of 8 pixels, the last chunk of 4
  runs 2 trips past the last tile). Two parts miss by 2-4e-6 here, one by ~2e-3."""
  monkeypatch.setattr(stencil, "STATS_PROGRAMS", programs)
  monkeypatch.setenv("QLHS_STENCIL_TILING", spec)
  b, h, w, n = shape
  rng = np.random.default_rng(11)
  dx = jnp.asarray(rng.normal(size=(b, h, w, n, e)), jnp.bfloat16)
  k9 = jnp.asarray(rng.normal(size=(9, n, e)), jnp.float32)
  add, add2 = (jnp.asarray(rng.normal(size=shape), t) for t in (jnp.float32, jnp.bfloat16))
  want = (numpy_d_transpose(np.asarray(dx.astype(jnp.float32), np.float64),
                            np.asarray(k9, np.float64), 1, h, w)
          + np.asarray(add) + np.asarray(add2.astype(jnp.float32)))
  got = np.asarray(stencil.d_transpose(dx, k9, 1, (h, w), addends=(add, add2),
                                       interpret=True, dot=True))
  assert got.shape == want.shape
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-6


@pytest.mark.parametrize("programs", [1056, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape,e,spec", [((2, 6, 5, 4), 4, "product_dot=8,2,4,2"),
                                          ((2, 9, 7, 16), 4, "product_dot=16,4,4,3"),
                                          ((2, 5, 8, 8), 2, "product_dot=8,8,4,1"),
                                          ((1, 5, 8, 8), 4, "")])
def test_the_dot_product_and_pass_4_match_numpy(monkeypatch, shape, e, spec, stride,
                                                programs):
  """QLHS_PRODUCT_FORM=pallas_dot: the forward product p and pass 4's dx and dc with D u
  as matrix products and c and dp as products with the identity, against float64 of the
  same values, both strides, with one tile a program and with chunks of several
  (``programs`` 3: the last chunk runs past the last tile). Float32 (operands at
  HIGHEST) to 2e-6 of the largest. Bfloat16 (training's): D's kernel in three bfloat16
  parts, so every product is exact and dx, kept in float32, is within 1e-6 (two parts
  miss by more); p and dc are stored in bfloat16, one rounding."""
  monkeypatch.setattr(stencil, "STATS_PROGRAMS", programs)
  monkeypatch.setenv("QLHS_STENCIL_TILING", spec)
  names, real = [], stencil.pl.pallas_call

  def spy(*a, **k):
    names.append(k["name"])
    return real(*a, **k)
  monkeypatch.setattr(stencil.pl, "pallas_call", spy)
  b, h, w, n = shape
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  rng = np.random.default_rng(12)
  u, c5, dp5 = (rng.normal(size=shape), rng.normal(size=(b, ho, wo, n, e)),
                rng.normal(size=(b, ho, wo, n, e)))
  k9 = jnp.asarray(rng.normal(size=(9, n, e)), jnp.float32)
  vecs = [jnp.asarray(rng.normal(size=(1, n, e)), jnp.float32) for _ in range(5)]
  mul, add, cx, c0, mean = [np.asarray(v, np.float64) for v in vecs]
  for dtype, tol, stored in ((jnp.float32, 2e-6, 2e-6), (jnp.bfloat16, 1e-6, 8e-3)):
    u_, c_, dp_ = (jnp.asarray(a, dtype) for a in (u, c5, dp5))
    u64, c64, dp64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (u_, c_, dp_))
    x = np.einsum("tbhwn,tne->bhwne", numpy_taps(u64, stride), np.asarray(k9, np.float64))
    want = [(x * mul + add) * c64, dp64 * c64 * mul + (x - mean) * cx + c0,
            dp64 * (x * mul + add)]
    got = [stencil.product(u_, c_, k9, vecs[0], vecs[1], stride, interpret=True,
                           dot=True),
           *stencil.dx_dc(u_, c_, dp_, k9, *vecs, stride, jnp.float32, interpret=True,
                          dot=True)]
    for name, g, w_, bound in zip(("p", "dx", "dc"), got, want, (stored, tol, stored)):
      assert g.shape == w_.shape and g.dtype == (jnp.float32 if name == "dx" else dtype)
      err = np.abs(np.asarray(g.astype(jnp.float32), np.float64) - w_).max()
      assert err / np.abs(w_).max() < bound, f"{dtype.__name__} {name}: {err:.1e}"
  assert names == ["qlhs_product_dot", "qlhs_dx_dc_dot"] * 2, names


@pytest.mark.parametrize("stride", [1, 2])
def test_a_bfloat16_kernel_goes_into_the_products_as_one_part(monkeypatch, stride):
  """D's kernel given in bfloat16 (as d_bn_product gives it under QLHS_D_KERNEL=compute)
  with bfloat16 inputs: the forward product's and pass 4's products take it as one
  part, one row an input channel and not four, at the one-part default (16 channels a
  block) where QLHS_STENCIL_TILING is unset; du's (stride 1) keep three parts and their
  default. p, dx, dc and du against float64 of the same values: every product exact,
  so dx and du (kept in float32) to 1e-6; p and dc stored in bfloat16."""
  monkeypatch.delenv("QLHS_STENCIL_TILING", raising=False)
  shapes, real = [], stencil._k_block

  def spy(*a, **k):
    block = real(*a, **k)
    shapes.append((block.shape, block.dtype))
    return block
  monkeypatch.setattr(stencil, "_k_block", spy)
  b, h, w, n, e = 2, 9, 7, 32, 4
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  rng = np.random.default_rng(13)
  bf = lambda *s: jnp.asarray(rng.normal(size=s), jnp.bfloat16)
  u, c5, dp5, k9, dxin = (bf(b, h, w, n), bf(b, ho, wo, n, e), bf(b, ho, wo, n, e),
                          bf(9, n, e), bf(b, h, w, n, e))
  vecs = [jnp.asarray(rng.normal(size=(1, n, e)), jnp.float32) for _ in range(5)]
  mul, add, cx, c0, mean = [np.asarray(v, np.float64) for v in vecs]
  f64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
  x = np.einsum("tbhwn,tne->bhwne", numpy_taps(f64(u), stride), f64(k9))
  c64, dp64 = f64(c5), f64(dp5)
  want = [(x * mul + add) * c64, dp64 * c64 * mul + (x - mean) * cx + c0,
          dp64 * (x * mul + add)]
  got = [stencil.product(u, c5, k9, vecs[0], vecs[1], stride, interpret=True, dot=True),
         *stencil.dx_dc(u, c5, dp5, k9, *vecs, stride, jnp.float32, interpret=True,
                        dot=True)]
  if stride == 1:
    want.append(numpy_d_transpose(f64(dxin), f64(k9), 1, h, w))
    got.append(stencil.d_transpose(dxin, k9, 1, (h, w), out_dtype=jnp.float32,
                                   interpret=True, dot=True))
  for name, g, w_ in zip(("p", "dx", "dc", "du"), got, want):
    err = np.abs(f64(g) - w_).max() / np.abs(w_).max()
    assert err < (8e-3 if name in ("p", "dc") else 1e-6), f"{name}: {err:.1e}"
  # Nine taps a kernel (traced once for its channel blocks): (1 part x 16 channels, 16
  # x e hidden) blocks for the product's and pass 4's products, (8 x e, 8 x 4 parts)
  # for du's.
  forward = [((16, 16 * e), jnp.bfloat16)] * 9
  assert shapes == forward * 2 + ([((8 * e, 8 * 4), jnp.bfloat16)] * 9
                                  if stride == 1 else []), shapes


@pytest.mark.parametrize("stride,hw", [(3, (7, 8)), (2, (8, 6)), (2, (1, 1))])
def test_d_transpose_other_strides_and_edges_match_numpy(stride, hw):
  """du's general path (strides above 2: per-row indices, nine masked taps) and the
  parity classes at even sizes and at a one-pixel image, against the float64 scatter."""
  h, w = hw
  b, n, e = 2, 4, 2
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  rng = np.random.default_rng(2)
  dx, k9 = rng.normal(size=(b, ho, wo, n, e)), rng.normal(size=(9, n, e))
  got = stencil.d_transpose(jnp.asarray(dx, jnp.float32), jnp.asarray(k9, jnp.float32),
                            stride, (h, w), interpret=True)
  np.testing.assert_allclose(np.asarray(got), numpy_d_transpose(dx, k9, stride, h, w),
                             rtol=1e-5, atol=1e-5)


def test_bad_settings_are_refused(monkeypatch):
  for spec in ("stats=32,32,4", "du=32,24,4", "dx=32,32,4", "stats=32,32,4,55",
               "du=32,32,4 du=16,16,4", "sums=16,8,4,2", "sums_dot=64,16,4",
               "sums_dot=64,16,4,5", "du_dot=64,8,4", "du_dot=64,8,4,0",
               "product_dot=64,4,4", "product_dot=64,4,4,5"):
    monkeypatch.setenv("QLHS_STENCIL_TILING", spec)
    with pytest.raises(ValueError, match="QLHS_STENCIL_TILING"):
      stencil.tiling("du")
  monkeypatch.delenv("QLHS_STENCIL_TILING")
  with pytest.raises(ValueError, match="power-of-two channel count.*unset QLHS_STATS_FORM"):
    stencil.tap_stats(jnp.zeros((1, 4, 4, 3)), 1, interpret=False)
  # Interpreted, any channel count: one block of all channels.
  u = np.random.default_rng(2).normal(size=(1, 4, 5, 6))
  np.testing.assert_allclose(
      np.asarray(stencil.tap_stats(jnp.asarray(u, jnp.float32), 1, interpret=True)),
      numpy_stats(u, 1), rtol=2e-5, atol=2e-4)
  with pytest.raises(ValueError, match="one BatchNorm group"):
    stencil.check(4, "QLHS_STATS_FORM", groups=2)
  # The dot form's tiles are tl.dot's blocks: 16 or more each way on a GPU.
  with pytest.raises(ValueError, match="pallas_dot needs tiles of at least 16 pixels and "
                                       "16 channels.*8 of 8 channels; set QLHS_SUMS_FORM"):
    stencil.bn_sums(jnp.zeros((1, 8, 8, 8)), *[jnp.zeros((1, 8, 8, 8, 4))] * 2,
                    jnp.zeros((9, 8, 4)), *[jnp.zeros((1, 8, 4))] * 2, 1,
                    interpret=False, dot=True)
  # du's products: pixels, bj*e hidden channels and bj*4 columns (bfloat16 dx), each 16
  # or more: at e = 4, 4 input channels a block.
  with monkeypatch.context() as mp:
    mp.setenv("QLHS_STENCIL_TILING", "du_dot=16,2,4,3")
    with pytest.raises(ValueError, match="pallas_dot needs tiles of at least 16 pixels "
                                         "and 4 channels.*2 of 8 channels; set "
                                         "QLHS_DU_FORM"):
      stencil.d_transpose(jnp.zeros((1, 8, 8, 8, 4), jnp.bfloat16), jnp.zeros((9, 8, 4)),
                          1, (8, 8), interpret=False, dot=True)
  # The forward's products: pixels, 4 parts by bj input channels (bfloat16 u) and bj*e
  # hidden channels: at e = 4, 4 input channels a block.
  with monkeypatch.context() as mp:
    mp.setenv("QLHS_STENCIL_TILING", "product_dot=16,2,4,2")
    with pytest.raises(ValueError, match="pallas_dot needs tiles of at least 16 pixels "
                                         "and 4 channels.*2 of 8 channels; set "
                                         "QLHS_PRODUCT_FORM"):
      stencil.product(jnp.zeros((1, 8, 8, 8), jnp.bfloat16),
                      jnp.zeros((1, 8, 8, 8, 4), jnp.bfloat16), jnp.zeros((9, 8, 4)),
                      *[jnp.zeros((1, 8, 4))] * 2, 1, interpret=False, dot=True)
  # On a backend that runs neither Triton nor the interpreter: the variable named.
  with monkeypatch.context() as mp:
    mp.setattr(jax, "default_backend", lambda: "tpu")
    with pytest.raises(ValueError, match="QLHS_DU_FORM=pallas runs Triton kernels on an "
                                         "NVIDIA GPU .*not on 'tpu'; unset QLHS_DU_FORM"):
      stencil.d_transpose(jnp.zeros((1, 4, 4, 4, 2)), jnp.zeros((9, 4, 2)), 1, (4, 4))
  monkeypatch.setenv("QLHS_STATS_FORM", "gram")
  with pytest.raises(ValueError, match="QLHS_STATS_FORM='gram'.*pallas"):
    dbn.stats_form()
  monkeypatch.setenv("QLHS_SUMS_FORM", "triton")
  with pytest.raises(ValueError, match="QLHS_SUMS_FORM='triton'.*pallas"):
    dbn.sums_form()


@pytest.mark.parametrize("stride", [1, 2])
def test_grid_orders_give_the_same_results(monkeypatch, stride):
  """QLHS_STENCIL_GRID=channels swaps the grid's axes (each launch's grid is the other
  way round) and changes no result: every kernel, bit for bit, at a shape with two
  channel blocks, several tiles and chunks, and partial tiles. A bad order is refused."""
  monkeypatch.setenv("QLHS_STENCIL_TILING",
                     "stats=8,4,2,1 sums=8,4,2 du=8,4,2 product=8,4,2")
  (b, h, w, n), e = (3, 7, 6, 8), 2
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  rng = np.random.default_rng(5)
  f32 = lambda *size: jnp.asarray(rng.normal(size=size), jnp.float32)
  u, c5, dp5, k9, vec = (f32(b, h, w, n), f32(b, ho, wo, n, e), f32(b, ho, wo, n, e),
                         f32(9, n, e), f32(1, n, e))
  grids = []
  real = stencil.pl.pallas_call

  def spy(*a, **k):
    grids.append(k["grid"])
    return real(*a, **k)
  monkeypatch.setattr(stencil.pl, "pallas_call", spy)

  def run_all():
    outs = [stencil.tap_stats(u, stride, interpret=True, lags=False),
            stencil.bn_sums(u, c5, dp5, k9, vec, vec, stride, interpret=True),
            stencil.d_transpose(dp5, k9, stride, (h, w), interpret=True),
            stencil.product(u, c5, k9, vec, vec, stride, interpret=True),
            *stencil.dx_dc(u, c5, dp5, k9, vec, vec, vec, vec, vec, stride, jnp.float32,
                           interpret=True)]
    if stride == 1:
      outs.append(stencil.lag_sums(u, interpret=True))
    return jax.tree.leaves(outs)
  monkeypatch.setenv("QLHS_STENCIL_GRID", "pixels")
  want = run_all()
  pixel_grids, grids[:] = list(grids), []
  monkeypatch.setenv("QLHS_STENCIL_GRID", "channels")
  got = run_all()
  assert grids == [g[::-1] for g in pixel_grids] and all(g[0] != g[1] for g in grids)
  for x, y in zip(got, want):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  monkeypatch.setenv("QLHS_STENCIL_GRID", "rows")
  with pytest.raises(ValueError, match="QLHS_STENCIL_GRID='rows'.*pixels"):
    stencil.d_transpose(dp5, k9, stride, (h, w), interpret=True)


def spy_on_kernels(monkeypatch):
  """Counts the calls of the kernels' entry points: the variables must reach them."""
  calls = {"tap_stats": 0, "bn_sums": 0, "d_transpose": 0, "lag_sums": 0, "product": 0,
           "dx_dc": 0}
  for name in calls:
    real = getattr(stencil, name)

    def spy(*a, _real=real, _name=name, **k):
      calls[_name] += 1
      calls[_name + "_dot"] = calls.get(_name + "_dot", 0) + bool(k.get("dot"))
      return _real(*a, **k)
    monkeypatch.setattr(stencil, name, spy)
  return calls


def make_inputs(seed, shape, stride, e):
  rng = np.random.default_rng(seed)
  b, h, w, n = shape
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  u = rng.normal(size=shape) + 0.3
  c = rng.normal(size=(b, ho, wo, n * e))
  kernel = rng.normal(size=(3, 3, 1, e))
  scale = rng.uniform(0.5, 1.5, n * e)
  bias = rng.normal(size=n * e)
  weights = (rng.normal(size=c.shape), rng.normal(size=(1, n * e)),
             rng.normal(size=(1, n * e)))
  return (u, c, kernel, scale, bias), weights


def loss_of(fn, weights):
  w1, w2, w3 = weights

  def loss(*args):
    p, mean, var = fn(*args)
    return (p * w1).sum() + (mean * w2).sum() + (var * w3).sum()
  return loss


def float64_reference(fn, args, weights):
  """``fn``'s outputs and the gradients of ``loss_of`` in every argument, in float64."""
  with jax.enable_x64(True):
    a64 = [jnp.asarray(a) for a in args]
    grads = jax.grad(loss_of(fn, [jnp.asarray(w) for w in weights]),
                     argnums=range(len(args)))(*a64)
    return fn(*a64), grads


def d_bn_product_matches_float64(seed, stride):
  """d_bn_product's "xla" path with the forms the environment sets, on a (2, 7, 6, 8)
  u with e = 4: its outputs and all five gradients as float64 autodiff of the plain
  formula. Returns the float32 arguments."""
  args, weights = make_inputs(seed, (2, 7, 6, 8), stride, 4)
  want, ref = float64_reference(functools.partial(dbn.reference, stride=stride), args,
                                weights)
  op = functools.partial(dbn.d_bn_product, stride=stride, impl="xla")
  a32 = [jnp.asarray(a, jnp.float32) for a in args]
  for g, r in zip(op(*a32), want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-5, atol=2e-5)
  got = jax.grad(loss_of(op, [jnp.asarray(w, jnp.float32) for w in weights]),
                 argnums=range(5))(*a32)
  for name, g, r in zip(("u", "c", "kernel", "scale", "bias"), got, ref):
    err = np.abs(np.asarray(g) - np.asarray(r)).max() / np.abs(np.asarray(r)).max()
    assert err < 2e-5, f"d{name}: relative error {err:.1e}"
  return a32


@pytest.mark.parametrize("stats,sums", [("pallas", "pallas"), ("pallas_gram", "pallas"),
                                        ("pallas", "pallas_xhat"),
                                        ("pallas_dot", "pallas_dot")])
@pytest.mark.parametrize("stride", [1, 2])
def test_d_bn_product_with_the_pallas_forms_matches_float64_autodiff(monkeypatch, stride,
                                                                     stats, sums):
  """fuse_d_bn="xla" with the three Pallas forms (the statistics from lags at stride 1,
  or from all products; pass 3's sums from the taps' products, or from D u and xhat):
  outputs and all five gradients as float64 autodiff of the plain formula."""
  monkeypatch.setenv("QLHS_STATS_FORM", stats)
  monkeypatch.setenv("QLHS_SUMS_FORM", sums)
  du = "pallas_dot" if sums == "pallas_dot" else "pallas"
  monkeypatch.setenv("QLHS_DU_FORM", du)
  monkeypatch.setenv("QLHS_STENCIL_TILING", "stats=16,4,4,2 sums=8,4,2 du=16,4,4 "
                     "sums_dot=8,4,2,2 stats_dot=16,4,2,2 du_dot=8,4,2,2")
  calls = spy_on_kernels(monkeypatch)
  kinds, du_dots, real, real_du = [], [], stencil.bn_sums, stencil.d_transpose

  def bn_sums(*a, **k):
    kinds.append((k.get("xhat", False), k.get("dot", False)))
    return real(*a, **k)

  def d_transpose(*a, **k):
    du_dots.append(k.get("dot", False))
    return real_du(*a, **k)
  monkeypatch.setattr(stencil, "bn_sums", bn_sums)
  monkeypatch.setattr(stencil, "d_transpose", d_transpose)
  d_bn_product_matches_float64(3, stride)
  assert kinds and set(kinds) == {(sums == "pallas_xhat", sums == "pallas_dot")}, kinds
  assert du_dots and set(du_dots) == {du == "pallas_dot"}, du_dots
  assert calls["tap_stats"] and calls["bn_sums"] and calls["d_transpose"], calls
  assert bool(calls["lag_sums"]) == (stats != "pallas_gram" and stride == 1), calls
  assert not calls["product"] and not calls["dx_dc"], calls  # QLHS_PRODUCT_FORM unset


@pytest.mark.parametrize("form", ["pallas", "pallas_dot"])
@pytest.mark.parametrize("stride,spec", [(1, "product=8,4,2 product_dot=8,4,2,2"),
                                         (2, "product=16,8,4"), (1, None), (2, None)])
def test_product_and_dx_kernels_match_float64_autodiff(monkeypatch, stride, spec, form):
  """QLHS_PRODUCT_FORM=pallas: the forward product and pass 4 (dx and dc) as
  stencil.product and stencil.dx_dc, with the other Pallas forms: outputs and all five
  gradients as float64 autodiff (partial last tiles, two channel blocks at stride 1;
  ``spec`` None: the default tiles); a second BatchNorm group is refused by name.
  "pallas_dot": D u as matrix products (at stride 1)."""
  for var in ("QLHS_STATS_FORM", "QLHS_SUMS_FORM", "QLHS_DU_FORM"):
    monkeypatch.setenv(var, "pallas")
  monkeypatch.setenv("QLHS_PRODUCT_FORM", form)
  if spec is None:
    monkeypatch.delenv("QLHS_STENCIL_TILING", raising=False)
  else:
    monkeypatch.setenv("QLHS_STENCIL_TILING", spec)
  calls = spy_on_kernels(monkeypatch)
  a32 = d_bn_product_matches_float64(5, stride)
  # the forward alone and inside grad; pass 4 once
  assert (calls["product"], calls["dx_dc"]) == (2, 1), calls
  assert (calls["product_dot"], calls["dx_dc_dot"]) == ((2, 1) if form == "pallas_dot"
                                                        else (0, 0)), calls
  for var in ("QLHS_STATS_FORM", "QLHS_SUMS_FORM", "QLHS_DU_FORM"):
    monkeypatch.delenv(var)  # auto: XLA's forms on the CPU, which take any groups
  with pytest.raises(ValueError, match="QLHS_PRODUCT_FORM=pallas sums over one BatchNorm "
                                       "group, got 2"):
    dbn.d_bn_product(*a32, stride=stride, groups=2, impl="xla")
  monkeypatch.setenv("QLHS_PRODUCT_FORM", "triton")
  with pytest.raises(ValueError, match="QLHS_PRODUCT_FORM='triton': choose one of"):
    dbn.d_bn_product(*a32, stride=stride, impl="xla")


def set_dot_product_forms(monkeypatch, sums):
  """The forward product and pass 4 as matrix products, pass 3's sums too unless
  ``sums`` is "pallas" (its element-wise kernel), the statistics and du as Pallas
  kernels: the forms that make c and dp in their kernels, or may not."""
  monkeypatch.setenv("QLHS_PRODUCT_FORM", "pallas_dot")
  monkeypatch.setenv("QLHS_SUMS_FORM", "pallas" if sums == "pallas" else "pallas_dot")
  for var in ("QLHS_STATS_FORM", "QLHS_DU_FORM"):
    monkeypatch.setenv(var, "pallas")


def spy_on_c(monkeypatch):
  """Counts, at trace time, the kernel calls that make c = C u themselves (``cw``
  given) and those that read a stored c, by entry point, "_aw" added to the key where
  the call makes dp = dy A^T too (``aw`` given), "_grads" where it sums C's and A's
  gradients (``w_grads``); "product_a" for the product that applies A itself
  (``stencil.product_a``: c and y made, p never stored); and XLA's c = C u
  (``d_bn_product.c_of``)."""
  calls = {}
  for name in ("product", "dx_dc", "bn_sums", "product_a"):
    real = getattr(stencil, name)

    def spy(*a, _real=real, _name=name, **k):
      key = (_name if _name == "product_a" else
             f"{_name}_{'cw' if k.get('cw') is not None else 'c'}"
             + ("_aw" if k.get("aw") is not None else "")
             + ("_grads" if k.get("w_grads") else ""))
      calls[key] = calls.get(key, 0) + 1
      return _real(*a, **k)
    monkeypatch.setattr(stencil, name, spy)
  real_c = dbn.c_of
  monkeypatch.setattr(dbn, "c_of", lambda *a: calls.update(
      xla=calls.get("xla", 0) + 1) or real_c(*a))
  return calls


@pytest.mark.parametrize("sums", ["pallas_dot", "pallas", "wide"])
@pytest.mark.parametrize("stride", [1, 2])
def test_c_made_in_the_kernels_matches_float64_autodiff(monkeypatch, stride, sums):
  """QLHS_C_FORM=kernels: the operation takes C's weight, and the dot forms' kernels
  (the forward product, pass 4; pass 3's sums where they are "pallas_dot") make c = C u
  themselves. Outputs and the gradients of u, C, D's kernel and BatchNorm's scale and
  bias as float64 autodiff of the plain formula with c = subsample(u) @ C (float32
  operands, at HIGHEST in the kernels), both strides. Where pass 3 is not a dot form,
  XLA's matmul makes c again in the backward for it, and only then; a block wider than
  ``C_KERNELS_MAX_N`` ("wide": the limit lowered under its 8 channels) gets c from
  XLA's matmul in the forward, and every pass reads it."""
  if sums == "wide":
    monkeypatch.setitem(dbn.C_KERNELS_MAX_N, "kernels", 4)
  set_dot_product_forms(monkeypatch, sums)
  monkeypatch.setenv("QLHS_C_FORM", "kernels")
  monkeypatch.setenv("QLHS_STENCIL_TILING", "product_dot=8,4,2,2 sums_dot=8,4,2,2")
  (u, _, kernel, scale, bias), weights = make_inputs(7, (2, 7, 6, 8), stride, 4)
  cw = np.random.default_rng(8).normal(size=(8, 32)) / 3

  def ref(u, cw, kernel, scale, bias):
    return dbn.reference(u, dbn.c_of(u, cw, stride), kernel, scale, bias, stride=stride)
  want, grads = float64_reference(ref, (u, cw, kernel, scale, bias), weights)
  calls = spy_on_c(monkeypatch)
  op = functools.partial(dbn.d_bn_product, stride=stride, impl="xla", c_weights=True)
  a32 = [jnp.asarray(a, jnp.float32) for a in (u, cw, kernel, scale, bias)]
  for g, r in zip(op(*a32), want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-5, atol=2e-5)
  assert calls == ({"product_c": 1, "xla": 1} if sums == "wide"
                   else {"product_cw": 1}), calls
  calls.clear()
  got = jax.grad(loss_of(op, [jnp.asarray(w, jnp.float32) for w in weights]),
                 argnums=range(5))(*a32)
  for name, g, r in zip(("u", "C", "kernel", "scale", "bias"), got, grads):
    assert g.shape == r.shape
    err = np.abs(np.asarray(g) - np.asarray(r)).max() / np.abs(np.asarray(r)).max()
    assert err < 2e-5, f"d{name}: relative error {err:.1e}"
  # the forward product; pass 4; pass 3's sums; XLA's c = C u for the gradients of u
  # and C (its VJP), and for pass 3 where it is not a dot form (in the forward: wide)
  want_calls = {"pallas_dot": {"product_cw": 1, "dx_dc_cw": 1, "bn_sums_cw": 1, "xla": 1},
                "pallas": {"product_cw": 1, "dx_dc_cw": 1, "bn_sums_c": 1, "xla": 2},
                "wide": {"product_c": 1, "dx_dc_c": 1, "bn_sums_c": 1, "xla": 2}}[sums]
  assert calls == want_calls, calls


@pytest.mark.parametrize("c_made", [False, True, "grads", "p"])
@pytest.mark.parametrize("sums", ["pallas_dot", "pallas", "wide"])
@pytest.mark.parametrize("stride", [1, 2])
def test_dp_made_in_the_kernels_matches_float64_autodiff(monkeypatch, stride, sums,
                                                         c_made):
  """QLHS_DP_FORM=kernels: the operation takes A's weight too and returns y = p @ A,
  and the dot forms' backward kernels (pass 4; pass 3's sums where they are
  "pallas_dot") make dp = dy A^T themselves, with c stored or made (``c_made``;
  "grads": made, and C's and A's gradients summed by pass 4, QLHS_WEIGHT_GRADS=pass4,
  where the block makes both c and dp; "p": and the forward's kernel applies A itself,
  QLHS_P_FORM=kernels, ``stencil.product_a``, where pass 4 sums A's gradient).
  Outputs and the gradients of u, C, A, D's kernel and BatchNorm's scale and bias as
  float64 autodiff of the plain formula followed by the 1x1 map (float32 operands, A to
  more channels than u has), both strides. Where pass 3 is not a dot form it reads
  XLA's dp; a block wider than ``DP_KERNELS_MAX_N`` ("wide": the limit lowered under
  its 8 channels) keeps the stored dp in every pass."""
  if sums == "wide":
    monkeypatch.setitem(dbn.DP_KERNELS_MAX_N, "kernels", 4)
  set_dot_product_forms(monkeypatch, sums)
  monkeypatch.setenv("QLHS_C_FORM", "kernels" if c_made else "stored")
  monkeypatch.setenv("QLHS_DP_FORM", "kernels")
  monkeypatch.setenv("QLHS_WEIGHT_GRADS", "pass4" if c_made in ("grads", "p") else "xla")
  monkeypatch.setenv("QLHS_P_FORM", "kernels" if c_made == "p" else "stored")
  if c_made in ("grads", "p"):  # chunks of 3 tiles, the last redoing one: counted once
    monkeypatch.setattr(stencil, "STATS_PROGRAMS", 8)
  monkeypatch.setenv("QLHS_STENCIL_TILING", "product_dot=8,4,2,2 sums_dot=8,4,2,2 "
                     "grads_dot=8,4,2,2 product_a_dot=8,4,2,2")
  (u, _, kernel, scale, bias), (_, *weights) = make_inputs(11, (2, 7, 6, 8), stride, 4)
  rng = np.random.default_rng(12)
  cw, aw = rng.normal(size=(8, 32)) / 3, rng.normal(size=(32, 16)) / 4
  ho, wo = (7 - 1) // stride + 1, (6 - 1) // stride + 1
  weights = [rng.normal(size=(2, ho, wo, 16))] + weights  # y's: 16 channels

  def ref(u, cw, aw, kernel, scale, bias):
    p, mean, var = dbn.reference(u, dbn.c_of(u, cw, stride), kernel, scale, bias,
                                 stride=stride)
    return dbn.a_of(p, aw), mean, var
  want, grads = float64_reference(ref, (u, cw, aw, kernel, scale, bias), weights)
  calls = spy_on_c(monkeypatch)

  def op(u, cw, aw, kernel, scale, bias):
    c = cw if c_made else dbn.c_of(u, cw, stride)
    return dbn.d_bn_product(u, c, kernel, scale, bias, stride=stride, impl="xla",
                            c_weights=c_made, a=aw)
  a32 = [jnp.asarray(a, jnp.float32) for a in (u, cw, aw, kernel, scale, bias)]
  for g, r in zip(op(*a32), want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-5, atol=2e-5)
  calls.clear()
  got = jax.grad(loss_of(op, [jnp.asarray(w, jnp.float32) for w in weights]),
                 argnums=range(6))(*a32)
  for name, g, r in zip(("u", "C", "A", "kernel", "scale", "bias"), got, grads):
    assert g.shape == r.shape
    err = np.abs(np.asarray(g) - np.asarray(r)).max() / np.abs(np.asarray(r)).max()
    assert err < 2e-5, f"d{name}: relative error {err:.1e}"
  c = "cw" if c_made else "c"
  made = {"product": "product_a" if c_made == "p" else f"product_{c}",
          "dx_dc": f"dx_dc_{c}_aw" + ("_grads" if c_made in ("grads", "p") else ""),
          "bn_sums": f"bn_sums_{c}_aw"}
  if sums == "pallas":  # pass 3 reads XLA's dp (and, where c is made, XLA's c)
    made["bn_sums"] = "bn_sums_c"
  if sums == "wide":  # every pass reads XLA's dp; p is stored for A's gradient
    made.update(product=f"product_{c}", dx_dc=f"dx_dc_{c}", bn_sums=f"bn_sums_{c}")
  kernels = {k: v for k, v in calls.items() if k != "xla"}
  assert kernels == {v: 1 for v in made.values()}, kernels


def test_the_dp_form_sets_the_widest_block_that_makes_dp(monkeypatch):
  """"kernels" makes dp in blocks of up to 128 channels in and out (stages 1 and 2, not
  stage 3's first block, 128 -> 256); "stored" in none, and no form with
  fuse_d_bn="pallas". Without the product's dot form it is refused, by name, with the
  fix."""
  monkeypatch.setenv("QLHS_PRODUCT_FORM", "pallas_dot")
  blocks = ((64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512),
            (512, 512))
  for form, want in (("stored", 0), ("kernels", 3)):
    monkeypatch.setenv("QLHS_DP_FORM", form)
    assert [b for b in blocks if dbn._makes_dp(*b, 1, "xla")] == list(blocks[:want])
    assert not any(dbn._makes_dp(*b, 1, "pallas") for b in blocks), form
  monkeypatch.setenv("QLHS_PRODUCT_FORM", "pallas")
  with pytest.raises(ValueError, match="QLHS_DP_FORM='kernels' makes dp = dy A\\^T "
                                       "inside the matrix-product kernels.*set "
                                       "product_form='pallas_dot'"):
    dbn.dp_form()


def test_weights_given_to_a_kernel_that_cannot_make_c_or_dp_are_refused():
  """C's or A's weight given to the element-wise forms (which read c and dp) is refused,
  naming the tensor, its setting and the form that makes it."""
  (u, c, kernel, _, _), _ = make_inputs(3, (2, 5, 5, 4), 1, 4)
  u, c = jnp.asarray(u, jnp.float32), jnp.asarray(c, jnp.float32).reshape(2, 5, 5, 4, 4)
  k9, v = jnp.ones((9, 4, 4)), jnp.ones((1, 4, 4))
  cw, aw = jnp.ones((4, 16)), jnp.ones((16, 8))
  with pytest.raises(ValueError, match="c = C u inside pass 3's kernel \\(QLHS_C_FORM="
                                       "kernels\\) needs its dot form: QLHS_SUMS_FORM="
                                       "pallas_dot"):
    stencil.bn_sums(u, None, c, k9, v, v, 1, interpret=True, cw=cw)
  with pytest.raises(ValueError, match="dp = dy A\\^T inside the kernel \\(QLHS_DP_FORM="
                                       "kernels\\) needs the dot form's tiles: "
                                       "QLHS_PRODUCT_FORM=pallas_dot"):
    stencil.dx_dc(u, c, jnp.ones((2, 5, 5, 8)), k9, v, v, v, v, v, 1, jnp.float32,
                  interpret=True, aw=aw)


@pytest.mark.parametrize("stride", [1, 2])
def test_dp_made_in_the_kernels_in_bfloat16_is_the_stored_dp_to_a_rounding(monkeypatch,
                                                                           stride):
  """QLHS_DP_FORM=kernels with training's dtypes (u, c and A in bfloat16): dp is made
  in float32 and rounded to bfloat16, as XLA's matmul stores it, so y and the
  gradients are those of the stored dp (QLHS_DP_FORM unset: y = p @ A by the model's
  matmul, differentiated by autodiff): at most 1% of any output's values apart by more
  than 1e-4 of its largest (on this CPU none), and none by more than 1e-2."""
  for var, form in (("QLHS_PRODUCT_FORM", "pallas_dot"), ("QLHS_SUMS_FORM", "pallas_dot"),
                    ("QLHS_STATS_FORM", "pallas"), ("QLHS_DU_FORM", "pallas")):
    monkeypatch.setenv(var, form)
  monkeypatch.delenv("QLHS_STENCIL_TILING", raising=False)
  monkeypatch.delenv("QLHS_C_FORM", raising=False)
  rng = np.random.default_rng(13)
  n, e, n_out = 16, 4, 32
  (u, c, kernel, scale, bias), (_, *weights) = make_inputs(13, (2, 9, 7, n), stride, e)
  aw = jnp.asarray(rng.normal(size=(n * e, n_out)) / 8, jnp.bfloat16)
  u, c = jnp.asarray(u, jnp.bfloat16), jnp.asarray(c, jnp.bfloat16)
  rest = [jnp.asarray(a, jnp.float32) for a in (kernel, scale, bias)]
  ws = [jnp.asarray(rng.normal(size=c.shape[:3] + (n_out,)), jnp.float32)] + [
      jnp.asarray(w, jnp.float32) for w in weights]
  op = functools.partial(dbn.d_bn_product, stride=stride, impl="xla")

  def stored(u, c, aw, *r):
    p, mean, var = op(u, c, *r)
    return dbn.a_of(p, aw), mean, var
  made = lambda u, c, aw, *r: op(u, c, *r, a=aw)
  runs = outputs_by_form(monkeypatch, "QLHS_DP_FORM", {"": stored, "kernels": made},
                         (u, c, aw, *rest), ws, "dx_dc_c_aw")
  assert_one_rounding_apart(runs["kernels"], runs[""])


@pytest.mark.parametrize("d_kernel", ["compute", "float32"])
@pytest.mark.parametrize("stride", [1, 2])
def test_p_made_in_the_kernel_in_bfloat16_is_the_stored_p_to_a_rounding(monkeypatch,
                                                                        stride, d_kernel):
  """QLHS_P_FORM=kernels with training's dtypes (u, C and A in bfloat16), c and dp made
  and the weight gradients summed in pass 4: the forward's kernel rounds p to bfloat16
  before its product with A, as the stored p is, so y and the gradients are those of
  p stored (QLHS_P_FORM unset: the product's kernel writes p, XLA's matmul applies A):
  at most 1% of any output's values apart by more than 1e-4 of its largest, and none
  by more than 1e-2. D's kernel in the compute dtype (one part, as on the GPU) or in
  float32 (three bfloat16 parts a product). Planted, p not rounded before A: this test
  fails."""
  for var, form in (("QLHS_PRODUCT_FORM", "pallas_dot"), ("QLHS_SUMS_FORM", "pallas_dot"),
                    ("QLHS_STATS_FORM", "pallas"), ("QLHS_DU_FORM", "pallas"),
                    ("QLHS_C_FORM", "kernels"), ("QLHS_DP_FORM", "kernels"),
                    ("QLHS_WEIGHT_GRADS", "pass4"),
                    ("QLHS_D_KERNEL", "compute" if d_kernel == "compute" else "")):
    monkeypatch.setenv(var, form)
  monkeypatch.setenv("QLHS_STENCIL_TILING", "product_a_dot=16,8,4,2")  # two blocks
  rng = np.random.default_rng(21)
  n, e, n_out = 16, 4, 32
  (u, _, kernel, scale, bias), (_, *weights) = make_inputs(21, (2, 9, 7, n), stride, e)
  cw = jnp.asarray(rng.normal(size=(n, n * e)) / 4, jnp.bfloat16)
  aw = jnp.asarray(rng.normal(size=(n * e, n_out)) / 8, jnp.bfloat16)
  u = jnp.asarray(u, jnp.bfloat16)
  rest = [jnp.asarray(a, jnp.float32) for a in (kernel, scale, bias)]
  ho, wo = (9 - 1) // stride + 1, (7 - 1) // stride + 1
  ws = [jnp.asarray(rng.normal(size=(2, ho, wo, n_out)), jnp.float32)] + [
      jnp.asarray(w, jnp.float32) for w in weights]
  op = lambda u, cw, aw, *r: dbn.d_bn_product(u, cw, *r, stride=stride, impl="xla",
                                              c_weights=True, a=aw)
  runs = outputs_by_form(monkeypatch, "QLHS_P_FORM", {"stored": op, "kernels": op},
                         (u, cw, aw, *rest), ws, "product_a")
  assert_one_rounding_apart(runs["kernels"], runs["stored"])


def test_the_p_form_needs_the_weight_gradients_in_pass_4(monkeypatch):
  """QLHS_P_FORM=kernels without QLHS_WEIGHT_GRADS=pass4 (A's gradient would need p,
  which the kernel does not store) is refused by name, with the fix; a bad value
  too."""
  monkeypatch.setenv("QLHS_PRODUCT_FORM", "pallas_dot")
  monkeypatch.setenv("QLHS_P_FORM", "kernels")
  with pytest.raises(ValueError, match="QLHS_P_FORM='kernels' applies A inside the "
                                       "product's kernel.*set weight_grads='pass4'"):
    dbn.p_form()
  for var in ("QLHS_C_FORM", "QLHS_DP_FORM"):
    monkeypatch.setenv(var, "kernels")
  monkeypatch.setenv("QLHS_WEIGHT_GRADS", "pass4")
  assert dbn.p_form() == "kernels"
  monkeypatch.setenv("QLHS_P_FORM", "kernel")
  with pytest.raises(ValueError, match="QLHS_P_FORM='kernel': choose one of"):
    dbn.p_form()


def test_the_c_form_sets_the_widest_block_that_makes_c(monkeypatch):
  """"kernels" makes c in blocks of up to 128 input channels (stages 1 and 2),
  "kernels_wide" up to 256 (stage 3 too); "stored" in none, and no form with the
  element-wise product or fuse_d_bn="pallas" (which "kernels_wide" refuses, as
  "kernels" does)."""
  monkeypatch.setenv("QLHS_PRODUCT_FORM", "pallas_dot")
  widths = (64, 128, 256, 512)
  for form, want in (("stored", []), ("kernels", [64, 128]),
                     ("kernels_wide", [64, 128, 256])):
    monkeypatch.setenv("QLHS_C_FORM", form)
    assert [n for n in widths if dbn._makes_c(n, 1, "xla")] == want, form
    assert not any(dbn._makes_c(n, 1, "pallas") for n in widths), form
  monkeypatch.setenv("QLHS_PRODUCT_FORM", "pallas")
  with pytest.raises(ValueError, match="QLHS_C_FORM='kernels_wide' makes c = C u inside "
                                       "the matrix-product kernels"):
    dbn.c_form()


@pytest.mark.parametrize("stride", [1, 2])
def test_c_made_in_the_kernels_in_bfloat16_is_the_stored_c_to_a_rounding(monkeypatch,
                                                                         stride):
  """QLHS_C_FORM=kernels with training's dtypes (u and C in bfloat16): c is made in
  float32 and rounded to bfloat16, as XLA's matmul stores it, so the outputs and
  gradients are those of the stored c (QLHS_C_FORM unset, c = C u by XLA and the
  gradients through it by autodiff): at most 1% of any output's values apart by more
  than 1e-4 of its largest (on this CPU none), and none by more than 1e-2."""
  for var, form in (("QLHS_PRODUCT_FORM", "pallas_dot"), ("QLHS_SUMS_FORM", "pallas_dot"),
                    ("QLHS_STATS_FORM", "pallas"), ("QLHS_DU_FORM", "pallas")):
    monkeypatch.setenv(var, form)
  monkeypatch.delenv("QLHS_STENCIL_TILING", raising=False)
  rng = np.random.default_rng(9)
  n, e = 16, 4
  (u, _, kernel, scale, bias), weights = make_inputs(9, (2, 9, 7, n), stride, e)
  cw = jnp.asarray(rng.normal(size=(n, n * e)) / 4, jnp.bfloat16)
  u = jnp.asarray(u, jnp.bfloat16)
  rest = [jnp.asarray(a, jnp.float32) for a in (kernel, scale, bias)]
  ws = [jnp.asarray(w, jnp.float32) for w in weights]
  op = functools.partial(dbn.d_bn_product, stride=stride, impl="xla")
  stored = lambda u, cw, *r: op(u, dbn.c_of(u, cw, stride), *r)
  made = functools.partial(op, c_weights=True)
  runs = {}
  for name, fn, form in (("stored", stored, ""), ("made", made, "kernels")):
    monkeypatch.setenv("QLHS_C_FORM", form)
    grads = jax.grad(loss_of(fn, ws), argnums=range(5))(u, cw, *rest)
    runs[name] = jax.tree.leaves((fn(u, cw, *rest), grads))
  assert_one_rounding_apart(runs["made"], runs["stored"])


def outputs_by_form(monkeypatch, var, fns, args, ws, made_call):
  """``{value: leaves}``: for each ``value: fn`` of ``fns`` (the stored form first, the
  form that makes the tensor in the kernels last), with ``var`` set to the value, fn's
  outputs at ``args`` and the gradients of ``loss_of(fn, ws)`` in every argument; the
  kernel call ``made_call`` (a :func:`spy_on_c` key) is traced under the last alone."""
  runs, last = {}, list(fns)[-1]
  for value, fn in fns.items():
    monkeypatch.setenv(var, value)
    calls = spy_on_c(monkeypatch)
    grads = jax.grad(loss_of(fn, ws), argnums=range(len(args)))(*args)
    runs[value] = jax.tree.leaves((fn(*args), grads))
    assert bool(calls.get(made_call)) == (value == last), calls
  return runs


def assert_one_rounding_apart(made, stored):
  """The outputs and gradients of a hidden tensor made in the kernels (``made``) are
  those of the stored one (``stored``), in their dtypes and shapes, up to one bfloat16
  rounding of it: at most 1% of any output's values apart by more than 1e-4 of its
  largest, none by more than 1e-2. (An order of the tensor's sums that rounds one of
  its values the other way moves a few values by a rounding; the tensor not rounded as
  the stored one is would move most of them.)"""
  for g, w in zip(made, stored, strict=True):
    assert g.dtype == w.dtype and g.shape == w.shape
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    far = np.abs(g - w) > 1e-4 * np.abs(w).max()
    assert far.mean() <= 0.01 and np.abs(g - w).max() <= 1e-2 * np.abs(w).max(), (
        far.mean(), np.abs(g - w).max())


@pytest.mark.parametrize("stride", [1, 2])
def test_the_products_take_a_kernel_rounded_to_the_compute_dtype_as_one_part(
    monkeypatch, stride):
  """QLHS_PRODUCT_FORM=pallas_dot with QLHS_D_KERNEL=compute, bfloat16 u and c: the
  product's and pass 4's products take D's kernel as one part, and the outputs and all
  five gradients are, bit for bit, those of three parts of the kernel rounded before
  (its other two parts zero: the same products, summed in the same order)."""
  monkeypatch.setenv("QLHS_PRODUCT_FORM", "pallas_dot")
  monkeypatch.delenv("QLHS_STENCIL_TILING", raising=False)
  parts, real = [], stencil._k_block
  monkeypatch.setattr(stencil, "_k_block",
                      lambda k, e, bj, p, *a, **kw: parts.append(p) or real(k, e, bj, p,
                                                                            *a, **kw))
  args, ws = bfloat16_inputs(6, (2, 7, 6, 16), stride)
  op = functools.partial(dbn.d_bn_product, stride=stride, impl="xla")
  run = lambda a: jax.tree.leaves((op(*a), jax.grad(loss_of(op, ws), argnums=range(5))(*a)))
  rounded = args[:2] + [args[2].astype(jnp.bfloat16).astype(jnp.float32)] + args[3:]
  want = run(rounded)
  assert parts and set(parts) == {stencil.K_PARTS}, parts
  parts.clear()
  monkeypatch.setenv("QLHS_D_KERNEL", "compute")
  got = run(args)
  assert parts and set(parts) == {1}, parts
  for g, w in zip(got, want):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize("du", ["pallas", "pallas_dot"])
@pytest.mark.parametrize("stride", [1, 2])
def test_eq3_block_with_the_pallas_forms_matches_float64_autodiff(monkeypatch, stride, du):
  """fuse_d_bn="block" with both Pallas forms (du with the 1x1 path's du1 as the
  addend; du also as matrix products): y, the statistics and all six gradients as
  float64 autodiff."""
  monkeypatch.setenv("QLHS_STATS_FORM", "pallas")
  monkeypatch.setenv("QLHS_DU_FORM", du)
  monkeypatch.setenv("QLHS_STENCIL_TILING", "stats=16,16,4,3 du=16,16,4 du_dot=16,8,4,2")
  monkeypatch.setenv("QLHS_BLOCK_TILING", "16,4")
  rng = np.random.default_rng(4)
  b, h, n, e, n_out = 2, 6, 16, 2, 16
  ho = (h - 1) // stride + 1
  args = (rng.normal(size=(b, h, h, n)) + 0.3, rng.normal(size=(n, n * e)) / 4,
          rng.normal(size=(n * e, n_out)) / 4, rng.normal(size=(3, 3, 1, e)),
          rng.uniform(0.5, 1.5, n * e), rng.normal(size=n * e))
  weights = (rng.normal(size=(b, ho, ho, n_out)), rng.normal(size=(1, n * e)),
             rng.normal(size=(1, n * e)))
  want, ref = float64_reference(functools.partial(eq3_block.reference, stride=stride), args,
                                weights)
  calls = spy_on_kernels(monkeypatch)
  op = functools.partial(eq3_block.eq3_hidden, stride=stride, interpret=True)
  a32 = [jnp.asarray(a, jnp.float32) for a in args]
  for g, r in zip(op(*a32), want):
    err = np.abs(np.asarray(g) - np.asarray(r)).max() / np.abs(np.asarray(r)).max()
    assert err < 1e-4, err
  got = jax.grad(loss_of(op, [jnp.asarray(w, jnp.float32) for w in weights]),
                 argnums=range(6))(*a32)
  for name, g, r in zip(("u", "cw", "aw", "kernel", "scale", "bias"), got, ref):
    err = np.abs(np.asarray(g) - np.asarray(r)).max() / np.abs(np.asarray(r)).max()
    assert err < 1e-4, f"d{name}: relative error {err:.1e}"
  assert calls["tap_stats"] and calls["d_transpose"], calls


@pytest.mark.parametrize("form", ["pallas", "pallas_dot"])
@pytest.mark.parametrize("stride,kj", [(1, 1), (2, 4)])
def test_shifted_t_with_the_pallas_du_matches_float64_autodiff(monkeypatch, stride, kj,
                                                               form):
  """d_impl="shifted_t" (j-major, one input channel per group) takes its input gradient
  from stencil.d_transpose under QLHS_DU_FORM=pallas (or pallas_dot): autodiff's in
  float64."""
  rng = np.random.default_rng(7)
  j, e = 4, 4
  x = rng.standard_normal((2, 7, 6, j, 1))
  k = rng.standard_normal((3, 3, kj, e))
  w = rng.standard_normal((2, (7 - 1) // stride + 1, (6 - 1) // stride + 1, j * e))

  def loss(x, k, impl, w):
    return (layers.derivative(x, k, stride, impl) * w).sum()
  with jax.enable_x64(True):
    want = jax.grad(loss, (0, 1))(jnp.asarray(x), jnp.asarray(k), "shifted", jnp.asarray(w))
  monkeypatch.setenv("QLHS_DU_FORM", form)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  dots, real = [], stencil.d_transpose
  monkeypatch.setattr(stencil, "d_transpose",
                      lambda *a, **k: dots.append(k.get("dot")) or real(*a, **k))
  got = jax.grad(loss, (0, 1))(f32(x), f32(k), "shifted_t", f32(w))
  assert dots == [form == "pallas_dot"], f"QLHS_DU_FORM={form}: {dots}"
  for g, r in zip(got, want):
    assert g.shape == r.shape and g.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_taps_copied_through_l1_give_the_same_values(monkeypatch, stride):
  """QLHS_TAP_COPY=l1 gathers each tap's channels in runs of 8 bytes (4 bfloat16
  channels) so that Triton copies them through L1 (benchmarks/NOTES.md, experiment 54):
  the same channels in the same order, so the dot forms' lags, pass 3's sums, forward
  product, pass 4, product with A and du give the very same bits as with the widest
  runs, in bfloat16 at 8 channels a block (two runs each). And it reaches the kernels: the
  channel offsets are the runs' sum (a division and a remainder) there alone."""
  monkeypatch.setenv("QLHS_STENCIL_TILING", "stats_dot=16,8,4,2 sums_dot=16,8,4,2 "
                     "product_dot=16,8,4,2 product_a_dot=16,8,4,2 du_dot=16,2,4,2")
  n, e, shape = 16, 4, (2, 9, 7, 16)
  b, h, w, _ = shape
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  rng = np.random.default_rng(31)
  bf = lambda *size: jnp.asarray(rng.normal(size=size), jnp.bfloat16)
  u, c5, dp5 = bf(*shape), bf(b, ho, wo, n, e), bf(b, ho, wo, n, e)
  cw, aw, k9b = bf(n, n * e), bf(n * e, 2 * n), bf(9, n, e)
  k9, vecs = k9b.astype(jnp.float32), [jnp.asarray(rng.normal(size=(1, n, e)),
                                                   jnp.float32) for _ in range(5)]

  def run():
    out = [stencil.bn_sums(u, c5, dp5, k9, vecs[0], vecs[1], stride, interpret=True,
                           dot=True),
           stencil.product(u, c5, k9, vecs[0], vecs[1], stride, interpret=True, dot=True),
           stencil.dx_dc(u, c5, dp5, k9, *vecs, stride, jnp.float32, interpret=True,
                         dot=True),
           stencil.product_a(u, cw, aw, k9b, vecs[0], vecs[1], stride, interpret=True)]
    if stride == 1:  # (du's dot form: 8 hidden channels a block, two runs)
      out += [stencil.lag_sums(u, interpret=True, dot=True),
              stencil.d_transpose(c5, k9, 1, (h, w), addends=(u,), out_dtype=jnp.bfloat16,
                                  interpret=True, dot=True)]
    return jax.tree.leaves(out)
  monkeypatch.setenv("QLHS_TAP_COPY", "widest")
  widest = run()
  monkeypatch.setenv("QLHS_TAP_COPY", "l1")
  l1 = run()
  assert len(l1) == len(widest) == (9 if stride == 1 else 7)
  for a, b_ in zip(widest, l1):
    assert a.dtype == b_.dtype
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                  np.asarray(b_.astype(jnp.float32)))
  i = jax.lax.broadcasted_iota(jnp.int32, (1, 16), 1)
  for copy, runs in (("widest", False), ("l1", True)):
    monkeypatch.setenv("QLHS_TAP_COPY", copy)
    np.testing.assert_array_equal(stencil._tap_runs(i, 16, jnp.bfloat16),
                                  np.arange(16)[None])
    text = str(jax.make_jaxpr(lambda: stencil._tap_runs(i, 16, jnp.bfloat16))())
    assert ("div" in text and "rem" in text) == runs, text
    # a run of 8 bytes or fewer already (4 bfloat16 or 2 float32 channels): unchanged
    assert "div" not in str(jax.make_jaxpr(lambda: stencil._tap_runs(i[:, :4], 4,
                                                                     jnp.bfloat16))())
    assert "div" not in str(jax.make_jaxpr(lambda: stencil._tap_runs(i[:, :2], 2,
                                                                     jnp.float32))())
  # A mask in place of the tile's own is for lean tiles (stride 1), whose rows it names.
  tile = eq3_block._Tile(0, {"stride": 2, "h": 4, "w": 4, "m": 8, "rows": 16, "ho": 2,
                             "wo": 2, "b": 4})
  with pytest.raises(ValueError, match="ok is for lean tiles"):
    tile.operand(None, 0, 0, None, ok=jnp.ones(8, bool))


def test_lean_taps_pad_only_the_interpreted_input():
  """At stride 1 a tap's rows start at a constant offset from the tile's first row, which
  can lie before the input's first row. On a GPU those rows are masked and nothing is
  copied; interpreted (a dynamic_slice would move the start), the input gets W + 1 zero
  rows in front, as far as a tap reaches back, and the starts move by as many. Stride 2
  keeps per-row indices."""
  plan = {"stride": 1, "w": 5}
  x2 = jnp.arange(60 * 4, dtype=jnp.float32).reshape(60, 4)
  gpu_plan, gpu_x2 = stencil.lean_plan(plan, x2, interpret=False)
  assert gpu_x2 is x2 and gpu_plan == {"stride": 1, "w": 5, "lean": True, "guard": 0}
  cpu_plan, cpu_x2 = stencil.lean_plan(plan, x2, interpret=True)
  assert cpu_plan["lean"] and cpu_plan["guard"] == 6
  np.testing.assert_array_equal(np.asarray(cpu_x2[:6]), 0)
  np.testing.assert_array_equal(np.asarray(cpu_x2[6:]), np.asarray(x2))
  assert stencil.lean_plan({"stride": 2, "w": 5}, x2, True) == ({"stride": 2, "w": 5}, x2)
  # The program traced for the GPU pads nothing before its kernels.
  dx, k9 = jnp.zeros((2, 6, 5, 4, 2), jnp.bfloat16), jnp.zeros((9, 4, 2))
  u = jnp.zeros((2, 6, 5, 4), jnp.bfloat16)
  for fn in (lambda: stencil.d_transpose(dx, k9, 1, (6, 5), interpret=False),
             lambda: stencil.lag_sums(u, interpret=False)):
    assert "pad" not in str(jax.make_jaxpr(fn)())


def test_chunks_of_tiles_that_run_past_the_end_count_nothing(monkeypatch):
  """With few programs each sums a chunk of several tiles, and the last chunk runs past
  the last tile (here 3 chunks of 4 for 10 tiles): those tiles count nothing, in the
  statistics and in pass 3's sums."""
  monkeypatch.setattr(stencil, "STATS_PROGRAMS", 3)
  monkeypatch.setenv("QLHS_STENCIL_TILING", "stats=8,4,4,2 sums=8,4,4")
  rng = np.random.default_rng(9)
  b, h, w, n, e = 2, 5, 8, 4, 2  # 80 pixels: 10 tiles of 8
  args = (rng.normal(size=(b, h, w, n)) + 0.3, rng.normal(size=(b, h, w, n, e)),
          rng.normal(size=(b, h, w, n, e)), rng.normal(size=(9, n, e)),
          rng.normal(size=(1, n, e)), rng.uniform(0.5, 2.0, size=(1, n, e)))
  a32 = [jnp.asarray(a, jnp.float32) for a in args]
  np.testing.assert_allclose(np.asarray(stencil.tap_stats(a32[0], 1, interpret=True)),
                             numpy_stats(args[0], 1), rtol=2e-5, atol=2e-4)
  for g, w_ in zip(stencil.bn_sums(*a32, 1, interpret=True), numpy_bn_sums(*args, 1)):
    np.testing.assert_allclose(np.asarray(g), w_, rtol=2e-5, atol=2e-4)


def test_auto_picks_the_kernels_on_one_nvidia_gpu_only(monkeypatch):
  """Unset, each form is "auto": the Pallas kernels on one NVIDIA GPU (or while
  benchmarks.aot compiles for one: QLHS_PALLAS_INTERPRET=0) where they apply, XLA's
  forms elsewhere; a set form wins."""
  for var in ("QLHS_STATS_FORM", "QLHS_SUMS_FORM", "QLHS_DU_FORM", "QLHS_PALLAS_INTERPRET"):
    monkeypatch.delenv(var, raising=False)
  forms = lambda n, groups=1: (dbn.stats_form(n, groups), dbn.sums_form(n, groups),
                               dbn.du_form(n))
  assert forms(64) == ("xla", "xla", "gather")  # this CPU
  with monkeypatch.context() as mp:  # one H100, as JAX reports it
    mp.setattr(jax, "default_backend", lambda: "gpu")
    mp.setattr(jax, "device_count", lambda: 1)
    gpu = type("Device", (), {"device_kind": "NVIDIA H100 80GB HBM3"})()
    mp.setattr(jax, "devices", lambda: [gpu])
    assert forms(64) == ("pallas", "pallas", "pallas")
    assert forms(48) == ("xla", "xla", "gather")  # not a power of two
    assert forms(64, groups=2) == ("xla", "xla", "pallas")  # du sums no BatchNorm group
    mp.setattr(jax, "device_count", lambda: 8)  # no sharding rule for a Triton call
    assert forms(64) == ("xla", "xla", "gather")
    mp.setattr(jax, "device_count", lambda: 1)
    mp.setattr(gpu, "device_kind", "AMD Instinct MI300X")
    assert forms(64) == ("xla", "xla", "gather")
  monkeypatch.setenv("QLHS_PALLAS_INTERPRET", "0")
  assert forms(64) == ("pallas", "pallas", "pallas")
  monkeypatch.setenv("QLHS_SUMS_FORM", "xla")
  monkeypatch.setenv("QLHS_DU_FORM", "autodiff")
  assert forms(64) == ("pallas", "xla", "autodiff")
  monkeypatch.setenv("QLHS_STATS_FORM", "automatic")
  with pytest.raises(ValueError, match="QLHS_STATS_FORM='automatic'.*'auto'"):
    dbn.stats_form(64)


def test_auto_reaches_the_kernels_where_it_picks_them(monkeypatch):
  """fuse_d_bn="xla" with every form left to "auto", where auto picks the kernels (here
  made to, on this CPU, where they run interpreted): all three kernels run, and the
  outputs and gradients are float64 autodiff's."""
  for var in ("QLHS_STATS_FORM", "QLHS_SUMS_FORM", "QLHS_DU_FORM"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("QLHS_STENCIL_TILING", "stats=16,4,4,1 sums=8,4,2 du=16,4,4")
  monkeypatch.setattr(dbn, "stencil_on_gpu", lambda n, groups=1, e=1: groups == 1)
  args, weights = make_inputs(4, (2, 6, 7, 4), 1, 4)
  want, ref = float64_reference(functools.partial(dbn.reference, stride=1), args, weights)
  calls = spy_on_kernels(monkeypatch)
  op = functools.partial(dbn.d_bn_product, stride=1, impl="xla")
  a32 = [jnp.asarray(a, jnp.float32) for a in args]
  for g, r in zip(op(*a32), want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-5, atol=2e-5)
  got = jax.grad(loss_of(op, [jnp.asarray(w, jnp.float32) for w in weights]),
                 argnums=range(5))(*a32)
  for g, r in zip(got, ref):
    err = np.abs(np.asarray(g) - np.asarray(r)).max() / np.abs(np.asarray(r)).max()
    assert err < 2e-5, err
  assert calls["tap_stats"] and calls["bn_sums"] and calls["d_transpose"], calls


# (B, H, W, n), e, tiling, programs a walk aims for: partial strips (W below and past a
# power of two), two channel blocks, chunks of rows (a high aim splits every image; the
# last chunk runs past the image), one-row and one-column images, and narrow images
# side by side in a strip (W rounded up below the strip's width: 9 and 1 px at 32
# lanes, 3 px at 16), with lanes past the batch.
ROWS_CASES = [
    ((2, 6, 5, 4), 4, "du=4,4,2 sums=4,4,2 product=4,4,2", None),
    ((3, 7, 6, 8), 2, "du=8,4,2 sums=8,4,2 product=8,4,2", 10_000),
    ((1, 9, 9, 16), 1, "", 10_000),
    ((2, 1, 5, 4), 2, "du=2,4,2 sums=2,4,2 product=2,4,2", None),
    ((2, 5, 1, 4), 2, "", 10_000),
    ((2, 7, 6, 4), 2, "du=8,4,2 sums=8,4,2 product=8,4,2", 6),  # 3 chunks of 3 rows
    # 4 images of 3 columns to a 16-lane strip, the second group one image short
    ((5, 6, 3, 4), 2, "stats=16,4,4,1 du=16,4,4 sums=16,4,4 product=16,4,4", None),
]


def _row_walks(monkeypatch, kernels, spec, programs):
  """Sets QLHS_STENCIL_ROWS; returns the list that each launch's kernel is appended to."""
  monkeypatch.setenv("QLHS_STENCIL_ROWS", kernels)
  monkeypatch.setenv("QLHS_STENCIL_TILING", spec)
  if programs is not None:
    monkeypatch.setattr(stencil, "ROWS_PROGRAMS", programs)
  launched, real = [], stencil.pl.pallas_call

  def spy(kernel, *a, **k):
    launched.append(kernel.func.__name__)
    return real(kernel, *a, **k)
  monkeypatch.setattr(stencil.pl, "pallas_call", spy)
  return launched


@pytest.mark.parametrize("ahead", [True, False])
@pytest.mark.parametrize("shape,e,spec,programs", ROWS_CASES)
def test_row_walks_match_numpy_and_the_tiles(monkeypatch, shape, e, spec, programs, ahead):
  """QLHS_STENCIL_ROWS=all: du (with and without an addend, float32 and bfloat16 out),
  pass 3's sums and the statistics' lag sums equal float64 NumPy; the forward product
  and pass 4 equal the tiles' kernels (the same sums in the same order) to 2 units in
  the last place of the largest value: bit for bit with jax 0.11.2; with 0.12.1, whose
  CPU compiler runs both interpreted, a few values differ by up to one unit.
  Each launch is the row walk; with each step's rows loaded a step ahead (the default)
  and where used."""
  monkeypatch.setattr(stencil, "ROWS_AHEAD", ahead)
  b, h, w, n = shape
  rng = np.random.default_rng(11)
  f32 = lambda *size: jnp.asarray(rng.normal(size=size), jnp.float32)
  u, c5, dp5, k9 = f32(b, h, w, n), f32(b, h, w, n, e), f32(b, h, w, n, e), f32(9, n, e)
  add, mean = f32(b, h, w, n), f32(1, n, e)
  rstd = jnp.asarray(rng.uniform(0.5, 2.0, size=(1, n, e)), jnp.float32)
  f64 = lambda a: np.asarray(a, np.float64)

  def elementwise():
    return (stencil.product(u, c5, k9, mean, rstd, 1, interpret=True),
            *stencil.dx_dc(u, c5, dp5, k9, mean, rstd, rstd, mean, mean, 1, jnp.float32,
                           interpret=True))
  tiles = elementwise()
  launched = _row_walks(monkeypatch, "all", spec, programs)
  got = stencil.d_transpose(dp5, k9, 1, (h, w), interpret=True)
  assert got.shape == (b, h, w, n) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), numpy_d_transpose(f64(dp5), f64(k9), 1, h, w),
                             rtol=1e-5, atol=1e-5)
  dp16 = dp5.astype(jnp.bfloat16)
  got = stencil.d_transpose(dp16, k9, 1, (h, w), addends=(add, 2 * add),
                            out_dtype=jnp.bfloat16, interpret=True)
  want = numpy_d_transpose(f64(dp16), f64(k9), 1, h, w) + 3 * f64(add)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(f64(got), want, rtol=1e-2, atol=2e-2)
  got = stencil.bn_sums(u, c5, dp5, k9, mean, rstd, 1, interpret=True)
  for g, w_ in zip(got, numpy_bn_sums(*map(f64, (u, c5, dp5, k9, mean, rstd)), 1)):
    assert g.shape == w_.shape
    np.testing.assert_allclose(np.asarray(g), w_, rtol=2e-5, atol=2e-4)
  for x, y in zip(elementwise(), tiles):
    y = np.asarray(y)
    np.testing.assert_allclose(np.asarray(x), y, rtol=0,
                               atol=2 * np.spacing(np.abs(y).max()))
  got = stencil.lag_sums(u, interpret=True)
  np.testing.assert_allclose(np.asarray(got), numpy_lag_sums(f64(u)), rtol=2e-5, atol=2e-5)
  assert launched == ["_du_rows_kernel"] * 2 + ["_bn_sums_rows_kernel",
                                                "_product_rows_kernel", "_dx_dc_rows_kernel",
                                                "_lags_rows_kernel"]


def test_row_walks_split_images_into_chunks_and_strips(monkeypatch):
  """The plan: strips of at most m columns, chunks of rows only where the batch's strips
  and channel blocks give fewer programs than ROWS_PROGRAMS, and the guard and tail rows
  only interpreted."""
  monkeypatch.setenv("QLHS_STENCIL_GRID", "pixels")
  plan = stencil._rows_plan(256, 56, 56, 64, 4, 32, 16, interpret=False)
  assert (plan["m"], plan["strips"], plan["chunks"], plan["span"]) == (32, 2, 1, 56)
  assert (plan["guard"], plan["tail"]) == (0, 0)
  plan = stencil._rows_plan(8, 56, 56, 64, 4, 32, 16, interpret=True)
  # 1056 / (8 * 2 * 4) programs: 17 chunks of ceil(56 / 17) = 4 rows, so 14 of them
  assert (plan["chunks"], plan["span"], plan["guard"], plan["tail"]) == (14, 4, 2, 34)
  # Narrow images side by side: 4 of stage 4's 7-px rows in 8-lane slots of a 32-lane
  # strip, 2 of stage 3's 14-px rows; 256 / 4 and 256 / 2 groups of images.
  plan = stencil._rows_plan(256, 7, 7, 512, 4, 32, 16, interpret=False)
  assert (plan["m"], plan["per"], plan["groups"], plan["strips"], plan["chunks"]) == (
      32, 4, 64, 1, 1)
  plan = stencil._rows_plan(256, 14, 14, 256, 4, 32, 16, interpret=False)
  assert (plan["m"], plan["per"], plan["groups"], plan["strips"]) == (32, 2, 128, 1)


@pytest.mark.parametrize("stride", [1, 2])
def test_d_bn_product_with_row_walks_matches_float64_autodiff(monkeypatch, stride):
  """fuse_d_bn="xla" with every Pallas form and QLHS_STENCIL_ROWS=all: outputs and all
  five gradients as float64 autodiff. At stride 1 the four walks run (the product in
  the forward alone and inside grad); at stride 2 the tiles do."""
  for var in ("QLHS_STATS_FORM", "QLHS_SUMS_FORM", "QLHS_DU_FORM", "QLHS_PRODUCT_FORM"):
    monkeypatch.setenv(var, "pallas")
  launched = _row_walks(monkeypatch, "all", "stats=16,4,4,2 sums=4,4,2 du=4,4,2 "
                        "product=4,4,2", 10_000)
  d_bn_product_matches_float64(7, stride)
  walks = sorted(k for k in launched if "rows" in k)
  if stride == 1:  # the statistics: in the forward alone and inside grad; the backward
    # over the hidden tensors as one walk (bwd), then du's share from u
    assert walks == ["_bwd_rows_kernel", "_du_bn_rows_kernel", "_lags_rows_kernel",
                     "_lags_rows_kernel", "_product_rows_kernel",
                     "_product_rows_kernel"], launched
  else:
    assert not walks and "_du_parity_kernel" in launched, launched


def test_row_walks_each_kernel_alone_and_bad_values(monkeypatch):
  """QLHS_STENCIL_ROWS names the kernels that walk; the others keep their tiles. A bad
  or repeated name is refused by name, with the choices."""
  rng = np.random.default_rng(12)
  dx, k9 = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((1, 4, 4, 4, 2),
                                                                   (9, 4, 2)))
  u = jnp.asarray(rng.normal(size=(1, 4, 4, 4)), jnp.float32)
  launched = _row_walks(monkeypatch, "sums", "", None)
  stencil.d_transpose(dx, k9, 1, (4, 4), interpret=True)
  stencil.bn_sums(u, dx, dx, k9, k9[:1], k9[:1], 1, interpret=True)
  stencil.bn_sums(u, dx, dx, k9, k9[:1], k9[:1], 1, interpret=True, xhat=True)
  assert launched == ["_du_kernel", "_bn_sums_rows_kernel", "_bn_sums_kernel"]
  assert stencil.rows_kernels() == ("sums",)
  monkeypatch.setenv("QLHS_STENCIL_ROWS", "du, product")
  assert stencil.rows_kernels() == ("du", "product")
  monkeypatch.setenv("QLHS_STENCIL_ROWS", "")
  assert stencil.rows_kernels() == ()
  for bad in ("du,lags", "du,du", "all,du"):
    monkeypatch.setenv("QLHS_STENCIL_ROWS", bad)
    with pytest.raises(ValueError, match=r"QLHS_STENCIL_ROWS=.*want 'all' or a "
                                         r"comma-separated subset of \('stats', 'du', "
                                         r"'sums', 'product', 'dx_du', 'bwd'\)"):
      stencil.d_transpose(dx, k9, 1, (4, 4), interpret=True)


def numpy_dx_du(u, c5, dp5, k9, mul, add, cx, c0, mean):
  """Pass 4 then du in float64: (dc, du) with dx = dp*c*mul + (D u - mean)*cx + c0."""
  x = np.einsum("tbhwn,tne->bhwne", numpy_taps(u, 1), k9)
  dx = dp5 * c5 * mul + (x - mean) * cx + c0
  return dp5 * (x * mul + add), numpy_d_transpose(dx, k9, 1, *u.shape[1:3])


@pytest.mark.parametrize("ahead", [True, False])
@pytest.mark.parametrize("shape,e,spec,programs", ROWS_CASES)
def test_dx_du_walk_matches_numpy(monkeypatch, shape, e, spec, programs, ahead):
  """stencil.dx_du, pass 4 and du = D^T dx as one walk (dx never stored): dc and du
  equal float64 NumPy at every walk case (its tiling the product's), float32 and
  bfloat16 (inputs and du), with rows loaded ahead and where used. The case with 4
  lanes on 5-px rows runs at 8 lanes: a strip is whole rows."""
  monkeypatch.setattr(stencil, "ROWS_AHEAD", ahead)
  b, h, w, n = shape
  spec = " ".join(f"dx_du={t[len('product='):]}" for t in spec.split()
                  if t.startswith("product="))
  launched = _row_walks(monkeypatch, "", spec, programs)
  rng = np.random.default_rng(13)
  f64 = lambda *size: rng.normal(size=size)
  args = [f64(b, h, w, n), f64(b, h, w, n, e), f64(b, h, w, n, e), f64(9, n, e)]
  args += [f64(1, n, e) for _ in range(5)]  # mul, add, cx, c0, mean
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
    a = [jnp.asarray(v, dtype if i < 3 else jnp.float32) for i, v in enumerate(args)]
    dc, du = stencil.dx_du(*a, dtype, interpret=True)
    want_dc, want_du = numpy_dx_du(*(np.asarray(v, np.float64) for v in a))
    assert dc.shape == want_dc.shape and du.shape == want_du.shape
    assert dc.dtype == du.dtype == dtype
    for got, want in ((dc, want_dc), (du, want_du)):
      scale = np.abs(want).max()
      np.testing.assert_allclose(np.asarray(got, np.float64) / scale, want / scale,
                                 atol=tol)
  assert launched == ["_dx_du_rows_kernel"] * 2


@pytest.mark.parametrize("ahead", [True, False])
@pytest.mark.parametrize("shape,e,spec,programs", ROWS_CASES + [
    # du_bn's walk (stencil.du_bn_unrolled): the top row's step, trips of five rows
    # without a border row, then the steps to the bottom row's written out. One chunk of
    # 12 rows: two trips, then the bottom row; of 16 rows: two trips, then five rows.
    ((1, 12, 8, 4), 2, "product=8,4,2", 1),
    ((1, 16, 8, 4), 2, "product=8,4,2", 1),
    # two chunks of 9 rows: one trip, two steps to the bottom row's (step 7 of the
    # second chunk), then a step that is an inner row in the first chunk
    ((1, 17, 8, 4), 2, "product=8,4,2", 2)])
def test_bwd_and_du_bn_walks_match_numpy(monkeypatch, shape, e, spec, programs, ahead):
  """stencil.bwd (pass 3's sums, dc and du's share from g in one walk) and
  stencil.du_bn (du's share from u) equal float64 NumPy at every walk case (their
  tilings the product's), float32 and bfloat16, with rows loaded ahead and where used:
  dc, du_g = D^T(dp*c*mul), the sums of g, g*xhat and tap_t*g, and du_g + D^T((D u -
  mean)*cx + c0), which is pass 4's du (numpy_dx_du) where du_g is bwd's. Each chunk's
  sums count its own rows once (the walk also forms its neighbours' edge rows)."""
  monkeypatch.setattr(stencil, "ROWS_AHEAD", ahead)
  b, h, w, n = shape
  tiles = [t[len("product="):] for t in spec.split() if t.startswith("product=")]
  spec = " ".join(f"{k}={t}" for t in tiles for k in ("bwd", "du_bn"))
  launched = _row_walks(monkeypatch, "", spec, programs)
  rng = np.random.default_rng(17)
  f64 = lambda *size: rng.normal(size=size)
  args = [f64(b, h, w, n), f64(b, h, w, n, e), f64(b, h, w, n, e), f64(9, n, e)]
  args += [f64(1, n, e) for _ in range(5)]  # mul, add, cx, c0, mean
  rstd = rng.uniform(0.5, 2.0, size=(1, n, e))
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
    a = [jnp.asarray(v, dtype if i < 3 else jnp.float32) for i, v in enumerate(args)]
    u, c5, dp5, k9, mul, add, cx, c0, mean = a
    dc, du_g, sums = stencil.bwd(u, c5, dp5, k9, mul, add, mean, jnp.asarray(rstd, jnp.float32),
                                 interpret=True)
    du = stencil.du_bn(u, k9, cx, c0, mean, du_g, dtype, interpret=True)
    x = [np.asarray(v, np.float64) for v in a]
    want_dc, want_du = numpy_dx_du(*x)
    want_du_g = numpy_d_transpose(x[2] * x[1] * x[4], x[3], 1, h, w)
    assert dc.dtype == du.dtype == dtype and du_g.dtype == jnp.float32
    assert (dc.shape, du_g.shape, du.shape) == (want_dc.shape, u.shape, u.shape)
    for got, want in ((dc, want_dc), (du_g, want_du_g), (du, want_du)):
      scale = np.abs(want).max()
      np.testing.assert_allclose(np.asarray(got, np.float64) / scale, want / scale,
                                 atol=tol)
    for got, want in zip(sums, numpy_bn_sums(*x[:4], x[8], rstd, 1)):
      assert got.shape == want.shape
      scale = np.abs(want).max()
      np.testing.assert_allclose(np.asarray(got, np.float64) / scale, want / scale,
                                 atol=1e-5)
  assert launched == ["_bwd_rows_kernel", "_du_bn_rows_kernel"] * 2


def test_dx_du_walks_whole_rows(monkeypatch):
  """dx_du's strips are whole rows of their images (dx at x - 1 and x + 1 must be this
  program's own lanes): the tiling's pixels raised to W rounded up, its channels lowered
  as much; narrow images several to a strip. At stage 1 (56 px), 32 pixels and 8
  channels become 64 and 4."""
  plans = []

  def launch(kernel, plan, name, warps, interpret, out_shape, *args):
    plans.append(plan)
    return tuple(jnp.zeros(o.shape, o.dtype) for o in out_shape)
  monkeypatch.setattr(stencil, "_rows_call", launch)
  monkeypatch.setenv("QLHS_STENCIL_TILING", "dx_du=32,8,4")
  for b, side, n in ((256, 56, 64), (256, 28, 128), (256, 14, 256), (256, 7, 512)):
    u = jax.ShapeDtypeStruct((b, side, side, n), jnp.bfloat16)
    c = jax.ShapeDtypeStruct((b, side, side, n, 4), jnp.bfloat16)
    vec = jax.ShapeDtypeStruct((1, n, 4), jnp.float32)
    jax.eval_shape(lambda u, c, k, v: stencil.dx_du(u, c, c, k, v, v, v, v, v, u.dtype,
                                                    interpret=False),
                   u, c, jax.ShapeDtypeStruct((9, n, 4), jnp.float32), vec)
  got = [(p["m"], p["per"], p["strips"], p["bj"]) for p in plans]
  assert got == [(64, 1, 1, 4), (32, 1, 1, 8), (32, 2, 1, 8), (32, 4, 1, 8)], got


@pytest.mark.parametrize("stride", [1, 2])
def test_d_bn_product_with_dx_du_matches_float64_autodiff(monkeypatch, stride):
  """fuse_d_bn="xla" with QLHS_STENCIL_ROWS=dx_du (du as Pallas, the rest XLA's forms):
  outputs and all five gradients as float64 autodiff. At stride 1 pass 4 and du are
  the one walk; at stride 2 XLA's pass 4 and du's parity tiles run."""
  monkeypatch.setenv("QLHS_DU_FORM", "pallas")
  launched = _row_walks(monkeypatch, "dx_du", "dx_du=4,4,2 du=4,4,2", 10_000)
  d_bn_product_matches_float64(8, stride)
  if stride == 1:
    assert launched == ["_dx_du_rows_kernel"], launched
  else:
    assert launched == ["_du_parity_kernel"], launched


@pytest.mark.parametrize("stride", [1, 2])
def test_d_bn_product_with_bwd_matches_float64_autodiff(monkeypatch, stride):
  """fuse_d_bn="xla" with QLHS_STENCIL_ROWS=bwd (pass 3's sums and du as Pallas, the
  rest XLA's forms): outputs and all five gradients as float64 autodiff. At stride 1
  the backward over the hidden tensors is the one walk, then du's share from u; at
  stride 2 pass 3's tiles, XLA's pass 4 and du's parity tiles run."""
  monkeypatch.setenv("QLHS_SUMS_FORM", "pallas")
  monkeypatch.setenv("QLHS_DU_FORM", "pallas")
  launched = _row_walks(monkeypatch, "bwd", "bwd=4,4,2 du_bn=4,4,2 sums=4,4,2 du=4,4,2",
                        10_000)
  d_bn_product_matches_float64(9, stride)
  if stride == 1:
    assert launched == ["_bwd_rows_kernel", "_du_bn_rows_kernel"], launched
  else:
    assert launched == ["_bn_sums_kernel", "_du_parity_kernel"], launched


def test_bwd_runs_where_it_applies(monkeypatch):
  """QLHS_STENCIL_ROWS=bwd (or all) takes the backward's walk at stride 1, with pass 3's
  sums and du as Pallas and one BatchNorm group; elsewhere the passes run as before.
  bwd and du_bn refuse a strided c and per-group vectors by name."""
  monkeypatch.setenv("QLHS_SUMS_FORM", "pallas")
  monkeypatch.setenv("QLHS_DU_FORM", "pallas")
  for rows in ("bwd", "all", "dx_du,bwd"):
    monkeypatch.setenv("QLHS_STENCIL_ROWS", rows)
    assert dbn._bwd_walks(1, 8, 4, 1)
    assert not dbn._bwd_walks(2, 8, 4, 1) and not dbn._bwd_walks(1, 8, 4, 2)
  for var, form in (("QLHS_SUMS_FORM", "xla"), ("QLHS_DU_FORM", "gather")):
    monkeypatch.setenv(var, form)
    assert not dbn._bwd_walks(1, 8, 4, 1)
    monkeypatch.setenv(var, "pallas")
  for rows in ("", "dx_du,sums"):
    monkeypatch.setenv("QLHS_STENCIL_ROWS", rows)
    assert not dbn._bwd_walks(1, 8, 4, 1)
  z = lambda *s: jnp.zeros(s, jnp.float32)
  u, c, k9, v = z(1, 4, 4, 4), z(1, 4, 4, 4, 2), z(9, 4, 2), z(1, 4, 2)
  with pytest.raises(ValueError, match=r"bwd: c \(1, 2, 2, 4, 2\).*stride 1 only"):
    stencil.bwd(u, z(1, 2, 2, 4, 2), z(1, 2, 2, 4, 2), k9, v, v, v, v, interpret=True)
  with pytest.raises(ValueError, match=r"not \(1, 4, 2\) each: one BatchNorm group"):
    stencil.bwd(u, c, c, k9, v, z(2, 4, 2), v, v, interpret=True)
  with pytest.raises(ValueError, match=r"du_bn: .*one BatchNorm group only"):
    stencil.du_bn(u, k9, v, z(2, 4, 2), v, u, jnp.float32, interpret=True)


def test_dx_du_refuses_other_shapes():
  """dx_du is stride 1 and one BatchNorm group: a strided c or per-group vectors are
  refused by name."""
  z = lambda *s: jnp.zeros(s, jnp.float32)
  u, c, k9, v = z(1, 4, 4, 4), z(1, 4, 4, 4, 2), z(9, 4, 2), z(1, 4, 2)
  with pytest.raises(ValueError, match=r"dx_du: c \(1, 2, 2, 4, 2\).*stride 1 only"):
    stencil.dx_du(u, z(1, 2, 2, 4, 2), z(1, 2, 2, 4, 2), k9, v, v, v, v, v, jnp.float32,
                  interpret=True)
  with pytest.raises(ValueError, match=r"not \(1, 4, 2\) each: one BatchNorm group"):
    stencil.dx_du(u, c, c, k9, v, v, z(2, 4, 2), v, v, jnp.float32, interpret=True)


def test_dx_du_runs_where_it_applies(monkeypatch):
  """QLHS_STENCIL_ROWS=dx_du fuses pass 4 and du at stride 1, with du as Pallas and one
  BatchNorm group; at stride 2, with XLA's du, or with several groups, the two passes
  run as before. Unset (or naming other walks), never."""
  monkeypatch.setenv("QLHS_DU_FORM", "pallas")
  monkeypatch.setenv("QLHS_STENCIL_ROWS", "dx_du")
  assert dbn._dx_du_walks(1, 8, 4, 1)
  assert not dbn._dx_du_walks(2, 8, 4, 1) and not dbn._dx_du_walks(1, 8, 4, 2)
  monkeypatch.setenv("QLHS_STENCIL_ROWS", "all")
  assert dbn._dx_du_walks(1, 8, 4, 1)
  monkeypatch.setenv("QLHS_DU_FORM", "gather")
  assert not dbn._dx_du_walks(1, 8, 4, 1)
  monkeypatch.setenv("QLHS_DU_FORM", "pallas")
  for rows in ("", "du,product"):
    monkeypatch.setenv("QLHS_STENCIL_ROWS", rows)
    assert not dbn._dx_du_walks(1, 8, 4, 1)


@pytest.mark.parametrize("b,h,w,m0", [(5, 6, 3, 16), (2, 7, 6, 8), (1, 9, 9, 32), (2, 4, 10, 4),
                                      (3, 5, 1, 4)])
def test_walk_lanes_address_their_own_pixels_only(monkeypatch, b, h, w, m0):
  """A walk's addressing, lane by lane, as the kernels compute it (interpreted): every
  live lane's row is the pixel (image, r, x + s) it stands for, inside the batch and the
  image; a lane is live exactly there (on a GPU, a lane past the batch or the image
  would read or write another tensor's memory); a dead lane of a multi-image strip
  points at row 0; and at s = 0 the programs' chunks cover every pixel once."""
  monkeypatch.setenv("QLHS_STENCIL_GRID", "pixels")
  monkeypatch.setattr(stencil, "ROWS_PROGRAMS", 3 * b)  # chunks of rows too
  plan = stencil._rows_plan(b, h, w, 4, 1, m0, 4, interpret=True)
  programs, m = stencil._rows_programs(plan), plan["m"]
  rs, ss = range(-2, h + 3), range(-2, 3)
  i32 = jnp.int32

  def kernel(at_ref, ok_ref, lane_ref, r0_ref):
    st = stencil._Strip(plan)
    pid, lanes = stencil.pl.program_id(0), jax.lax.broadcasted_iota(i32, (m,), 0)
    for i, r in enumerate(rs):
      for j, s in enumerate(ss):
        at, ok = st._at(i32(r), s)
        at_ref[pid, i, j, :] = at + lanes if plan["per"] == 1 else at
        ok_ref[pid, i, j, :] = ok.astype(i32)
    lane_ref[pid, 0, :] = jnp.broadcast_to(st.img, (m,))
    lane_ref[pid, 1, :] = st.x
    r0_ref[pid, :] = jnp.broadcast_to(st.r0, (m,))
  shapes = [(programs, len(rs), len(ss), m)] * 2 + [(programs, 2, m), (programs, m)]
  at, ok, lane, r0 = (np.asarray(a) for a in stencil.pl.pallas_call(
      kernel, out_shape=[jax.ShapeDtypeStruct(sh, i32) for sh in shapes],
      grid=(programs, 1), interpret=True)())
  img, x = lane[:, 0][:, None, None, :], lane[:, 1][:, None, None, :]
  r = np.asarray(rs)[None, :, None, None]
  xs = x + np.asarray(ss)[None, None, :, None]
  want_ok = (img < b) & (x < w) & (r >= 0) & (r < h) & (xs >= 0) & (xs < w)
  np.testing.assert_array_equal(ok.astype(bool), want_ok)
  want_at = plan["guard"] + img * h * w + r * w + xs
  np.testing.assert_array_equal(np.where(want_ok, at, -1), np.where(want_ok, want_at, -1))
  if plan["per"] > 1:
    assert (at[~want_ok] == 0).all()
  seen = np.zeros((b, h, w), int)
  for p in range(programs):
    for i, row in enumerate(rs):
      if r0[p, 0] <= row < r0[p, 0] + plan["span"]:
        for k in np.nonzero(want_ok[p, i, 2])[0]:
          seen[lane[p, 0, k], row, lane[p, 1, k]] += 1
  assert (seen == 1).all(), seen


_COMPILE_ELEMENTWISE = textwrap.dedent("""
    import os
    import numpy as np
    from qlhs_jax.benchmarks import aot
    from qlhs_jax.kernels import stencil
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, SingleDeviceSharding
    dev = aot.compile_only_device()
    s = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(
        shape, dt, sharding=SingleDeviceSharding(dev))
    def kernels(u, c, k9, v):
      p = stencil.product(u, c, k9, v, v, 1, interpret=False)
      dx, dc = stencil.dx_dc(u, c, c, k9, v, v, v, v, v, 1, jnp.bfloat16,
                             interpret=False)
      return p, dx, dc
    n = int(os.environ.get("ELEMENTWISE_CHANNELS", "16"))
    with jax.set_mesh(Mesh(np.array([dev]), ("data",))):
      lowered = jax.jit(kernels).lower(
          s((8, 16, 16, n), jnp.bfloat16), s((8, 16, 16, n, 4), jnp.bfloat16),
          s((9, n, 4)), s((1, n, 4)))
    lowered.compile(aot.GEMM_OPTIONS["triton"])
""")


def _tiling_env(tiling: str | None, **extra) -> dict:
  """This process's environment for a compile at ``tiling`` (QLHS_STENCIL_TILING; None:
  the default tiles), with ``extra`` variables."""
  env = dict(os.environ, **extra)
  env.pop("QLHS_STENCIL_TILING", None)
  if tiling:
    env["QLHS_STENCIL_TILING"] = tiling
  return env


@pytest.mark.skipif(not (HAS_CUDA_PLUGIN and HAS_TRITON),
                    reason="needs JAX's CUDA plugin and triton")
@pytest.mark.parametrize("tiling", [None, "product=32,16,4"])
def test_the_elementwise_kernels_load_their_taps_without_barriers(tmp_path, tiling):
  """Compiled for an H100 without one: at the default tiles (16 pixels by 16 channels,
  8 warps: one element of a tap a thread) the product's and pass 4's kernels load each
  tap of u in the layout in which it multiplies the hidden channels, so their PTX has
  no barrier; at 32,16,4 (the default until 2026-12-06: four a thread) Triton moves each
  tap through shared memory, a store, a barrier and a load, before the next tap's load
  can issue (benchmarks/NOTES.md, experiment 38)."""
  kernels = h100_ptx_by_entry(_COMPILE_ELEMENTWISE, _tiling_env(tiling), tmp_path)
  barriers = {name: len(re.findall(r"\bbar\.sync\b", text))
              for name, text in kernels.items() if name.startswith(("qlhs_product",
                                                                     "qlhs_dx_dc"))}
  assert len(barriers) == 2, sorted(kernels)
  if tiling is None:
    assert set(barriers.values()) == {0}, barriers
  else:  # a store, a barrier and a load for each of the nine taps
    assert min(barriers.values()) >= 9, barriers


@pytest.mark.skipif(not (HAS_CUDA_PLUGIN and HAS_TRITON),
                    reason="needs JAX's CUDA plugin and triton")
def test_the_default_product_tiles_wait_less_often_for_their_loads(tmp_path):
  """The same kernels at 64 channels (stage 1's), assembled by ptxas: at the default
  tiles (one element of a tap a thread, D's kernel 36 floats a thread) a thread of the
  product waits for its global loads fewer times, and an SM holds more warps, than at
  16,32,8 (two elements, 72 floats, where ptxas has the taps wait one after another:
  8 waits; benchmarks/NOTES.md, experiment 39)."""
  from qlhs_jax.benchmarks import xla_floors
  code = {}
  for tiling in (None, "product=16,32,8"):
    dump = tmp_path / str(tiling)
    h100_ptx_by_entry(_COMPILE_ELEMENTWISE,
                      _tiling_env(tiling, ELEMENTWISE_CHANNELS="64"), dump)
    (c,) = [c for c in xla_floors.dump_functions(str(dump))
            if c["name"].startswith("qlhs_product")]
    code[tiling] = (c["rounds"], xla_floors.resident_warps(c["registers"], c["threads"],
                                                           c["shared"]))
  (waits, warps), (waits_before, warps_before) = code[None], code["product=16,32,8"]
  assert waits < waits_before, code
  assert warps >= warps_before, code


_COMPILE_SUMS = textwrap.dedent("""
    import numpy as np
    from qlhs_jax.benchmarks import aot
    from qlhs_jax.kernels import stencil
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, SingleDeviceSharding
    dev = aot.compile_only_device()
    s = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(
        shape, dt, sharding=SingleDeviceSharding(dev))
    from qlhs_jax.benchmarks.step import kernel_env
    def sums(u, c, k9, v, u2):
      du = lambda dot: stencil.d_transpose(c, k9, 1, (32, 32), out_dtype=u.dtype,
                                           interpret=False, dot=dot)
      with kernel_env("QLHS_STENCIL_TILING", "du_dot=64,8,4,1"):  # du's, one stage
        unpiped = du(True)
      product = [stencil.product(x, c, k9, v, v, stride, interpret=False, dot=True)
                 for x, stride in ((u, 1), (u2, 2))]
      dx = stencil.dx_dc(u, c, c, k9, v, v, v, v, v, 1, u.dtype, interpret=False, dot=True)
      kb = k9.astype(jnp.bfloat16)  # QLHS_D_KERNEL=compute's: one part, 32,16,4,2
      one_part = (stencil.product(u, c, kb, v, v, 1, interpret=False, dot=True),
                  stencil.dx_dc(u, c, c, kb, v, v, v, v, v, 1, u.dtype, interpret=False,
                                dot=True))
      return [(stencil.bn_sums(u, c, c, k9, v, v, 1, interpret=False, dot=dot),
               stencil.lag_sums(u, interpret=False, dot=dot), du(dot))
              for dot in (False, True)] + [unpiped, product, dx, one_part,
                                            stencil.bn_sums(u2, c, c, k9, v, v, 2,
                                                            interpret=False, dot=True)]
    with jax.set_mesh(Mesh(np.array([dev]), ("data",))):
      lowered = jax.jit(sums).lower(
          s((64, 32, 32, 64), jnp.bfloat16), s((64, 32, 32, 64, 4), jnp.bfloat16),
          s((9, 64, 4)), s((1, 64, 4)),  # 4 tiles a program: a loop to pipeline
          s((64, 64, 64, 64), jnp.bfloat16))  # c's pixels at stride 2
    lowered.compile(aot.GEMM_OPTIONS["triton"])
""")


_COMPILE_PARTIALS = textwrap.dedent("""
    import numpy as np
    from qlhs_jax.benchmarks import aot
    from qlhs_jax.kernels import stencil
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, SingleDeviceSharding
    dev = aot.compile_only_device()
    s = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(
        shape, dt, sharding=SingleDeviceSharding(dev))
    def sums(u, c5, dp5, k9, v):
      stats = stencil.stats_from_lags(stencil.lag_sums(u, interpret=False))
      return stats, stencil.bn_sums(u, c5, dp5, k9, v, v, 1, interpret=False)
    n, hidden = 16, jnp.bfloat16
    with jax.set_mesh(Mesh(np.array([dev]), ("data",))):
      lowered = jax.jit(sums).lower(
          s((8, 16, 16, n), jnp.bfloat16), s((8, 16, 16, n, 4), hidden),
          s((8, 16, 16, n, 4), hidden), s((9, n, 4)), s((1, n, 4)))
    lowered.compile(aot.GEMM_OPTIONS["triton"])
""")


_COMPILE_C_MADE = textwrap.dedent("""
    import sys
    import numpy as np
    from qlhs_jax.benchmarks import aot
    from qlhs_jax.kernels import stencil
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, SingleDeviceSharding
    dev = aot.compile_only_device()
    s = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(
        shape, dt, sharding=SingleDeviceSharding(dev))
    n, kernels, n_out = int(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3])
    # n_out: 0, or dp = dy A^T made too (QLHS_DP_FORM=kernels) from dy of n_out channels
    def made(u, cw, dp, k9, v, aw):  # D_KERNEL=compute's one part, at the default tiles
      calls = {"product": lambda: stencil.product(u, None, k9, v, v, 1, interpret=False,
                                                 dot=True, cw=cw),
               "dx_dc": lambda: stencil.dx_dc(u, None, dp, k9, v, v, v, v, v, 1, u.dtype,
                                              interpret=False, dot=True, cw=cw, aw=aw),
               "sums": lambda: stencil.bn_sums(u, None, dp, k9.astype(jnp.float32), v, v,
                                               1, interpret=False, dot=True, cw=cw, aw=aw),
               "grads": lambda: stencil.dx_dc(u, None, dp, k9, v, v, v, v, v, 1, u.dtype,
                                              interpret=False, dot=True, cw=cw, aw=aw,
                                              w_grads=True)}
      return [calls[k]() for k in kernels]
    dp = (16, 28, 28) + ((n_out,) if n_out else (n, 4))
    with jax.set_mesh(Mesh(np.array([dev]), ("data",))):
      lowered = jax.jit(made).lower(
          s((16, 28, 28, n)), s((n, 4 * n)), s(dp), s((9, n, 4)),
          s((1, n, 4), jnp.float32),  # several tiles a program: a loop to pipeline
          s((4 * n, n_out)) if n_out else None)
    lowered.compile(aot.GEMM_OPTIONS["triton"])
""")


@pytest.mark.skipif(not (HAS_CUDA_PLUGIN and HAS_TRITON),
                    reason="needs JAX's CUDA plugin and triton")
def test_c_made_in_the_kernels_compiles_for_an_h100_up_to_the_width_limit(tmp_path):
  """Compiled for an H100 without one, QLHS_C_FORM=kernels's three kernels at the widest
  blocks that make c (``d_bn_product.C_KERNELS_MAX_N``: 256 channels, "kernels_wide"'s
  stage 3; 128 under "kernels"): c's operands
  are copied a trip ahead with the taps', so the product, pass 4 and pass 3's sums wait
  for none of a trip's loads nor products (the sums' c at their default 32 pixels is
  mma.sync; at 64, until experiment 55, one wgmma a trip, waited for). Pass 3's sums at
  512 channels (stage 4) at 64 pixels do not compile: u's centre tap over 512 channels
  and C's columns need more shared memory than an H100 has, which is why wider blocks
  keep the stored c (benchmarks/NOTES.md, experiment 47). At 32 pixels they compile, at
  154 KB a program (one an SM); the limit stands (experiment 55)."""
  from qlhs_jax.benchmarks import xla_floors
  widest = max(dbn.C_KERNELS_MAX_N.values())
  script = _COMPILE_C_MADE.replace("sys.argv[1]", str(widest)).replace(
      "sys.argv[2]", '"product,dx_dc,sums"').replace("sys.argv[3]", "0")
  kernels = h100_ptx_by_entry(script, _tiling_env(None), tmp_path / "made")
  assert {k.split("__")[0] for k in kernels if k.startswith("qlhs_")} == {
      "qlhs_product_dot", "qlhs_dx_dc_dot", "qlhs_bn_sums_dot"}, sorted(kernels)
  trips = {c["name"]: c for c in xla_floors.dump_functions(str(tmp_path / "made"))}
  for name in ("qlhs_product_dot", "qlhs_dx_dc_dot", "qlhs_bn_sums_dot"):
    c = trips[name]
    assert c["loop_rounds"] == 0 and c["loop_ops"]["mma_waits"] == 0, (name, c)
  wide = _COMPILE_C_MADE.replace("sys.argv[1]", "512").replace(
      "sys.argv[2]", '"sums"').replace("sys.argv[3]", "0")
  with pytest.raises(AssertionError, match="Shared memory size limit exceeded"):
    h100_ptx_by_entry(wide, _tiling_env("sums_dot=64,16,4,3"), tmp_path / "wide")


@pytest.mark.skipif(not (HAS_CUDA_PLUGIN and HAS_TRITON),
                    reason="needs JAX's CUDA plugin and triton")
def test_dp_made_in_the_kernels_compiles_for_an_h100_up_to_the_width_limit(tmp_path):
  """Compiled for an H100 without one, QLHS_DP_FORM=kernels's two kernels, pass 4 and
  pass 3's sums, with c made too, at the widest blocks that make dp
  (``d_bn_product.DP_KERNELS_MAX_N``: 128 channels in and out): dy's tiles are copied a
  trip ahead with the taps', so pass 4 and the sums wait for none of a trip's loads nor
  products (at the sums' 64 pixels, until experiment 55, two wgmma a trip, c's and
  dp's, waited for). The sums of stage 3's first block, 128 channels to 256, at 64
  pixels do not compile: dy's tiles over 256 channels, with u's taps and centre tap,
  need more shared memory than an H100 has, which is why wider blocks keep the stored
  dp (benchmarks/NOTES.md, experiment 48). At 32 pixels they compile, at 114 KB a
  program (one an SM); the limit stands (experiment 55)."""
  from qlhs_jax.benchmarks import xla_floors
  widest = dbn.DP_KERNELS_MAX_N["kernels"]
  script = _COMPILE_C_MADE.replace("sys.argv[1]", str(widest)).replace(
      "sys.argv[2]", '"dx_dc,sums"').replace("sys.argv[3]", str(widest))
  kernels = h100_ptx_by_entry(script, _tiling_env(None), tmp_path / "made")
  assert {k.split("__")[0] for k in kernels if k.startswith("qlhs_")} == {
      "qlhs_dx_dc_dot", "qlhs_bn_sums_dot"}, sorted(kernels)
  trips = {c["name"]: c for c in xla_floors.dump_functions(str(tmp_path / "made"))}
  for name in ("qlhs_dx_dc_dot", "qlhs_bn_sums_dot"):
    c = trips[name]
    assert c["loop_rounds"] == 0 and c["loop_ops"]["mma_waits"] == 0, (name, c)
  wide = _COMPILE_C_MADE.replace("sys.argv[1]", str(widest)).replace(
      "sys.argv[2]", '"sums"').replace("sys.argv[3]", str(2 * widest))
  with pytest.raises(AssertionError, match="Shared memory size limit exceeded"):
    h100_ptx_by_entry(wide, _tiling_env("sums_dot=64,16,4,3"), tmp_path / "wide")
  # QLHS_WEIGHT_GRADS=pass4: pass 4 also sums u^T dc and p^T dy, at 4 warps since
  # experiment 53 (255 registers, fewer instructions and a lower latency floor than 8
  # warps' 128-170): two waits a trip for those products (wgmma: 64 and more rows).
  grads = _COMPILE_C_MADE.replace("sys.argv[1]", str(widest)).replace(
      "sys.argv[2]", '"grads"').replace("sys.argv[3]", str(widest))
  h100_ptx_by_entry(grads, _tiling_env(None), tmp_path / "grads")
  (c,) = [c for c in xla_floors.dump_functions(str(tmp_path / "grads"))
          if c["name"].startswith("qlhs_")]
  assert c["name"] == "qlhs_dx_dc_grads_dot" and c["threads"] == 128, c
  assert c["loop_rounds"] == 0 and c["loop_ops"]["mma_waits"] == 2, c
  assert c["registers"] <= 255, c


_COMPILE_PRODUCT_A = textwrap.dedent("""
    import numpy as np
    from qlhs_jax.benchmarks import aot
    from qlhs_jax.kernels import stencil
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, SingleDeviceSharding
    dev = aot.compile_only_device()
    s = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(
        shape, dt, sharding=SingleDeviceSharding(dev))
    def made(u, u2, cw, cw2, aw, aw2, k9, k92, v, v2):
      # stage 1, stage 2's first block (stride 2, 64 -> 128) and stage 2, at the default
      # tiles, D's kernel in one bfloat16 part (QLHS_D_KERNEL=compute)
      return (stencil.product_a(u, cw, aw, k9, v, v, 1, interpret=False),
              stencil.product_a(u, cw, aw2, k9, v, v, 2, interpret=False),
              stencil.product_a(u2, cw2, aw2, k92, v2, v2, 1, interpret=False))
    with jax.set_mesh(Mesh(np.array([dev]), ("data",))):
      lowered = jax.jit(made).lower(  # 256 images: several tiles a program
          s((256, 56, 56, 64)), s((256, 28, 28, 128)), s((64, 256)), s((128, 512)),
          s((256, 64)), s((512, 128)), s((9, 64, 4)), s((9, 128, 4)),
          s((1, 64, 4), jnp.float32), s((1, 128, 4), jnp.float32))
    lowered.compile(aot.GEMM_OPTIONS["triton"])
""")


@pytest.mark.skipif(not (HAS_CUDA_PLUGIN and HAS_TRITON),
                    reason="needs JAX's CUDA plugin and triton")
def test_the_product_with_a_compiles_for_an_h100_where_pass_4_sums_its_gradient(
    tmp_path):
  """Compiled for an H100 without one, QLHS_P_FORM=kernels's forward product
  (``stencil.product_a``) at the blocks where pass 4 sums A's gradient (stages 1 and 2,
  at most 128 channels in and out): each compiles at 128 threads in at most 255
  registers, its loop over the blocks of input channels nested in its loop over the
  tiles (unrolled, every block's operands would be held at once: 234 KiB of shared
  memory at stage 1, benchmarks/NOTES.md experiment 51)."""
  from qlhs_jax.benchmarks import xla_floors
  kernels = h100_ptx_by_entry(_COMPILE_PRODUCT_A, _tiling_env(None), tmp_path / "a")
  assert sorted(k.split("__")[0] for k in kernels if k.startswith("qlhs_")) == [
      "qlhs_product_a_dot"] * 3, sorted(kernels)
  for c in xla_floors.dump_functions(str(tmp_path / "a")):
    if c["name"].startswith("qlhs_"):
      assert c["threads"] == 128 and c["registers"] <= 255, c
      assert c["loop"] > c["inner"] > 0, c


_COMPILE_ONE_TILE_A = textwrap.dedent("""
    import json, os
    import numpy as np
    from qlhs_jax.benchmarks import aot, xla_floors
    from qlhs_jax.kernels import stencil
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, SingleDeviceSharding
    dev = aot.compile_only_device()
    s = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(
        shape, dt, sharding=SingleDeviceSharding(dev))
    def made(u, cw, aw, k9, v):
      return stencil.product_a(u, cw, aw, k9, v, v, 1, interpret=False)
    args = (s((4, 56, 56, 64)), s((64, 256)), s((256, 64)), s((9, 64, 4)),
            s((1, 64, 4), jnp.float32))  # 4 images: one tile a chunk
    with jax.set_mesh(Mesh(np.array([dev]), ("data",))):
      jitted = jax.jit(made)
      with open(os.environ["LOOPS_JSON"], "w") as f:
        json.dump(xla_floors.pallas_loops(jitted.trace(*args).jaxpr), f)
      jitted.lower(*args).compile(aot.GEMM_OPTIONS["triton"])
""")


@pytest.mark.skipif(not (HAS_CUDA_PLUGIN and HAS_TRITON),
                    reason="needs JAX's CUDA plugin and triton")
def test_the_product_with_a_at_one_tile_a_chunk_is_modelled_every_block(tmp_path,
                                                                         monkeypatch):
  """Compiled for an H100 without one, ``stencil.product_a`` where each program has
  one tile: its loop over the tiles runs once and is gone from the machine code, whose
  one loop is the loop over the channel blocks. ``xla_floors.floors`` runs that loop
  once a block (4 at 64 channels), as the traced inner loop says, not once as the
  traced outer loop does (which undercounted such launches until 2026-12-07,
  benchmarks/NOTES.md experiment 57)."""
  from qlhs_jax.benchmarks import triton_compile, xla_floors
  monkeypatch.delenv("QLHS_STENCIL_TILING", raising=False)
  plan = stencil._chunked_plan((4, 56, 56, 64), 1, *stencil.tiling("product_a_dot")[:2],
                               every_block=True)
  blocks = 64 // plan["bj"]
  assert plan["tpc"] == 1 and blocks > 1, plan
  loops_json = tmp_path / "loops.json"
  h100_ptx_by_entry(_COMPILE_ONE_TILE_A, _tiling_env(None, LOOPS_JSON=str(loops_json)),
                    tmp_path / "a")
  loops = json.loads(loops_json.read_text())
  assert [(d["trips"], d["inner"]) for d in loops] == [(1, blocks)], loops
  (c,) = [c for c in xla_floors.dump_functions(str(tmp_path / "a"))
          if c["name"].startswith("qlhs_product_a")]
  assert c["loop"] > 0 and c["inner"] == 0, c  # one loop, nothing nested
  (hlo,) = (tmp_path / "a").glob("*jit_made*after_optimizations.txt")
  (row,) = [r for r in xla_floors.floors(str(hlo), loops=loops)
            if r["kernel"].startswith("qlhs_product_a")]
  assert row["trips"] == (blocks, 1)
  assert row["floor_ms"] == pytest.approx(triton_compile.issue_floor_ms(
      c["instructions"] + c["loop"] * (blocks - 1), 0, 1, c["threads"] // 32,
      plan["chunks"]))


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs JAX's CUDA plugin")
def test_the_partial_sums_are_added_in_one_kernel_for_an_h100(tmp_path):
  """Compiled for an H100 without one: the statistics' lags and pass 3's sums each
  write one partial sum a program, and one kernel adds them up. XLA 0.12.1 pushed the
  slices that the callers take of the total into the reduction: 15 kernels for the
  lags and 2 for the sums, each reading the partials (benchmarks/NOTES.md, experiment
  46). XLA 0.11.2 never did, so there this test cannot fail."""
  h100_ptx_by_entry(_COMPILE_PARTIALS, dict(os.environ), tmp_path)
  (hlo,) = tmp_path.glob("*jit_sums*after_optimizations.txt")
  text = hlo.read_text()
  kernels = dict(re.findall(r"(%pallas_call[\w.]*) = .*?custom-call\(.*?"
                            r"(qlhs_lag_sums|qlhs_bn_sums)/pallas_call", text))
  assert sorted(kernels.values()) == ["qlhs_bn_sums", "qlhs_lag_sums"], kernels
  for name, kernel in kernels.items():
    operands = (line.split(" = ", 1)[1] for line in text.splitlines() if " = " in line)
    readers = [rhs for rhs in operands if re.search(re.escape(name) + r"[,)]", rhs)]
    assert len(readers) == 1, (kernel, readers)


@pytest.mark.skipif(not (HAS_CUDA_PLUGIN and HAS_TRITON),
                    reason="needs JAX's CUDA plugin and triton")
def test_the_dot_sums_load_through_triton_pipeline(tmp_path):
  """Compiled for an H100 without one: pass 3's sums and the statistics' lags as matrix
  products (QLHS_SUMS_FORM / QLHS_STATS_FORM=pallas_dot) load their operands as
  asynchronous copies into shared memory, issued trips ahead of the tensor-core products
  that use them; the element-wise kernels ("pallas") have no such copy, whatever their
  num_stages. In the machine code: the lags' copies, 8 bytes a thread at their default
  32 pixels, go through L1, where the taps overlap; du's products copy their taps past
  L1 at their default (3 stages) and load them through L1 at one stage; the forward
  product's and pass 4's copy every load of a trip ahead, and wait for none; the sums'
  products read their taps where the copies land, at strides 1 and 2
  (benchmarks/NOTES.md, experiments 39-44)."""
  from qlhs_jax.benchmarks import xla_floors
  kernels = h100_ptx_by_entry(_COMPILE_SUMS, _tiling_env(None), tmp_path)
  # The sums' products at strides 1 and 2, the lags' at 1: mma.sync (16 rows), which
  # the warps need not wait for, not Hopper's wgmma (experiment 45).
  for name, count in (("qlhs_bn_sums", 2), ("qlhs_lag_sums", 1)):
    dots = [t for k, t in kernels.items() if k.startswith(name + "_dot")]
    (plain,) = [t for k, t in kernels.items()
                if k.startswith(name) and not k.startswith(name + "_dot")]
    assert len(dots) == count, (name, len(dots))
    for dot in dots:
      assert "cp.async.commit_group" in dot, name
      assert "mma.sync" in dot and "wgmma" not in dot, name
    assert "cp.async" not in plain, name
  functions = xla_floors.dump_functions(str(tmp_path))
  trips = {c["name"]: c["loop_ops"] for c in functions}
  lags = trips["qlhs_lag_sums_dot"]
  assert lags["copies"] == 13 and lags["past_l1"] == 0 and lags["mma"] > 0, lags
  # The sums' products read the taps from the pipeliner's buffers, at strides 1 and 2
  # (the taps loaded masked, in u's dtype). Loaded in float32 and cast back, or
  # selected after a gathered load, each tap went from those buffers through the
  # warps' registers into another buffer: 22 barriers a trip, not 5 (experiment 44).
  # As tap^T @ g they wait for no product; as g^T @ tap (64 rows: wgmma) they had 5
  # barriers and 9 waits a trip (experiment 45). At their default 32 pixels a trip
  # copies the nine taps and c's and dp's tiles, two copies each (17 at 64 pixels, four
  # each, the default until experiment 55).
  sums = [c for c in functions if c["name"].startswith("qlhs_bn_sums_dot")]
  assert [(c["loop_ops"]["barriers"], c["loop_ops"]["copies"], c["loop_ops"]["mma_waits"])
          for c in sums] == [(3, 13, 0)] * 2, [c["loop_ops"] for c in sums]
  assert trips["qlhs_bn_sums"]["copies"] == 0 == trips["qlhs_lag_sums"]["copies"], trips
  assert "cp.async" not in kernels["qlhs_d_transpose"]
  # du's products at 64 pixels by 32 hidden channels: one (m64n32k16, two k-steps) a
  # tap, D's kernel's parts side by side, not a product each. At the default (3 stages)
  # its taps are 18 copies issued ahead, 16 bytes a thread, past L1; at 1 stage they
  # load through L1, a barrier before each product (experiment 41). Their products are
  # wgmma (64 pixel rows), each waited for in the trip that uses it (experiment 44).
  du = sorted([c["loop_ops"] for c in functions
               if c["name"].startswith("qlhs_d_transpose_dot")],
              key=lambda ops: ops["copies"])
  assert du == [{"barriers": 19, "copies": 0, "past_l1": 0, "mma": 18, "mma_waits": 9},
                {"barriers": 2, "copies": 18, "past_l1": 18, "mma": 18,
                 "mma_waits": 9}], du
  # The forward product and pass 4 as products at their default (64 pixels by 4 input
  # channels, 2 stages): per trip the nine taps (8 bytes a thread, twice: the parts'
  # columns repeat the channels; through L1) and c (and dp) times the identity (16
  # bytes, past L1) are copies issued a trip ahead, so a thread waits for none of its
  # loads in a trip (experiment 42); the product at stride 2 too, its taps at each
  # pixel's own rows. With D's kernel in bfloat16, one part, at its default (32 pixels
  # by 16 channels, 2 stages since experiment 55): the nine taps once (8 bytes a
  # thread, through L1), and each hidden tile two copies past L1, none waited for
  # (experiment 43).
  dots = [(c, 2 if c["name"].startswith("qlhs_dx_dc_dot") else 1) for c in functions
          if c["name"].startswith(("qlhs_product_dot", "qlhs_dx_dc_dot"))]
  assert sorted(hidden for _, hidden in dots) == [1, 1, 1, 2, 2], [c["name"]
                                                                   for c, _ in dots]
  three = [(c, h) for c, h in dots if c["loop_ops"]["copies"] == 18 + h]
  one = [(c, h) for c, h in dots if c["loop_ops"]["copies"] == 9 + 2 * h]
  assert sorted(h for _, h in three) == [1, 1, 2] and sorted(h for _, h in one) == [1, 2], [
      (c["name"], c["loop_ops"]) for c, _ in dots]
  for (c, hidden), past_l1 in [(d, d[1]) for d in three] + [(d, 2 * d[1]) for d in one]:
    ops = c["loop_ops"]
    assert ops["past_l1"] == past_l1 and c["loop_rounds"] == 0, (c["name"], ops)
    assert ops["mma"] >= 9 + hidden, c


_COMPILE_TAPS = textwrap.dedent("""
    import numpy as np
    from qlhs_jax.benchmarks import aot
    from qlhs_jax.kernels import stencil
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, SingleDeviceSharding
    dev = aot.compile_only_device()
    s = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(
        shape, dt, sharding=SingleDeviceSharding(dev))
    def taps(u, dy, cw, aw, k9, kb, v, dx):
      # the stack's kernels whose taps are 16 bytes a thread: the forward product with A
      # and du at their defaults, pass 3's sums (c and dp made) and the lags at 64
      # pixels
      return (stencil.bn_sums(u, None, dy, k9, v, v, 1, interpret=False, dot=True,
                              cw=cw, aw=aw),
              stencil.product_a(u, cw, aw, kb, v, v, 1, interpret=False),
              stencil.lag_sums(u, interpret=False, dot=True),
              stencil.d_transpose(dx, k9, 1, (32, 32), out_dtype=u.dtype,
                                  interpret=False, dot=True))
    with jax.set_mesh(Mesh(np.array([dev]), ("data",))):
      lowered = jax.jit(taps).lower(
          s((64, 32, 32, 64)), s((64, 32, 32, 64)), s((64, 256)), s((256, 64)),
          s((9, 64, 4), jnp.float32), s((9, 64, 4)), s((1, 64, 4), jnp.float32),
          s((64, 32, 32, 64, 4)))
    lowered.compile(aot.GEMM_OPTIONS["triton"])
""")


@pytest.mark.skipif(not (HAS_CUDA_PLUGIN and HAS_TRITON),
                    reason="needs JAX's CUDA plugin and triton")
def test_taps_in_runs_of_8_bytes_are_copied_through_l1(tmp_path):
  """Compiled for an H100 without one: at 64 pixels by 16 channels a thread copies 16
  bytes of a tap, which Triton copies past L1 (cp.async.cg), each tap a read of u from
  L2: pass 3's sums' and the forward product with A's nine a trip, the lags' 13; du's
  (64 pixels by 32 hidden channels) 18, two a tap of dx. With QLHS_TAP_COPY=l1 each is
  two 8-byte copies through L1 (cp.async.ca), the other copies (c's centre tap, dy)
  unchanged, and so are the products (benchmarks/NOTES.md, experiment 54)."""
  from qlhs_jax.benchmarks import xla_floors
  ops = {}
  for copy in ("widest", "l1"):
    h100_ptx_by_entry(_COMPILE_TAPS,
                      _tiling_env("stats_dot=64,16,4,3 sums_dot=64,16,4,3",
                                  QLHS_TAP_COPY=copy), tmp_path / copy)
    ops[copy] = {c["name"].split("__")[0]: c["loop_ops"]
                 for c in xla_floors.dump_functions(str(tmp_path / copy))
                 if c["name"].startswith("qlhs_")}
  widest, l1 = ops["widest"], ops["l1"]
  assert sorted(widest) == sorted(l1) == ["qlhs_bn_sums_dot", "qlhs_d_transpose_dot",
                                          "qlhs_lag_sums_dot", "qlhs_product_a_dot"], ops
  for name, taps in (("qlhs_bn_sums_dot", 9), ("qlhs_product_a_dot", 9),
                     ("qlhs_lag_sums_dot", 13), ("qlhs_d_transpose_dot", 18)):
    w, o = widest[name], l1[name]
    assert w["past_l1"] >= taps and o["past_l1"] == w["past_l1"] - taps, (name, w, o)
    assert o["copies"] == w["copies"] + taps and o["mma"] == w["mma"], (name, w, o)
  assert l1["qlhs_lag_sums_dot"]["past_l1"] == 0 == l1["qlhs_d_transpose_dot"]["past_l1"]
