"""``BN(D u) * c`` with the hand-written backward (qlhs_jax.kernels.d_bn_product).

The reference is the plain formula, ``layers.derivative`` + BatchNorm + product,
differentiated by JAX in float64; the operation runs in float32 (its passes accumulate in
float32, as on the GPU). The Pallas kernels run in interpret mode here; that they lower
to Triton for a CUDA device is checked on this CPU too (the compile to PTX is not).
"""

import functools
import glob
import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlhs_jax.kernels import d_bn_product as dbn
from qlhs_jax.kernels import settings
from tests.benchmarks.test_aot import HAS_CUDA_PLUGIN

EPS = 1e-5


def plain(u, c, kernel, scale, bias, stride, groups):
  """The plain path's formula (``reference``: derivative, BatchNorm, product)."""
  return dbn.reference(u, c, kernel, scale, bias, stride=stride, groups=groups, eps=EPS)


def numpy_forward(u, c, kernel, scale, bias, stride, groups):
  """Independent float64 NumPy loops for p, mean and var."""
  b, h, w, n = u.shape
  e = kernel.shape[-1]
  k = np.broadcast_to(kernel, (3, 3, n, e))
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  up = np.pad(u, ((0, 0), (1, 1), (1, 1), (0, 0)))
  x = np.zeros((b, ho, wo, n, e))
  for oy in range(ho):
    for ox in range(wo):
      for dy in range(3):
        for dx in range(3):
          x[:, oy, ox] += up[:, oy * stride + dy, ox * stride + dx, :, None] * k[dy, dx]
  x = x.reshape(b, ho, wo, n * e)
  xg = x.reshape((groups, -1, n * e))
  mean = xg.mean(1)
  var = xg.var(1)
  y = (xg - mean[:, None]) / np.sqrt(var[:, None] + EPS) * scale + bias
  return y.reshape(x.shape) * c, mean, var


def make_inputs(seed, shape, stride, e, kj, groups, dtype=np.float64):
  rng = np.random.default_rng(seed)
  b, h, w, n = shape
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  u = rng.normal(size=shape) + 0.3  # a mean far from 0: the centred backward matters
  c = rng.normal(size=(b, ho, wo, n * e))
  kernel = rng.normal(size=(3, 3, kj, e))
  scale = rng.uniform(0.5, 1.5, n * e) * rng.choice([-1, 1], n * e)
  bias = rng.normal(size=n * e)
  weights = (rng.normal(size=c.shape), rng.normal(size=(groups, n * e)),
             rng.normal(size=(groups, n * e)))
  return tuple(a.astype(dtype) for a in (u, c, kernel, scale, bias)), weights


def loss_of(fn, weights):
  """A loss that reads all three outputs, so every cotangent path is exercised."""
  w1, w2, w3 = weights

  def loss(*args):
    p, mean, var = fn(*args)
    return ((p * w1).sum() + (mean * w2).sum() + (var * w3).sum()).astype(jnp.float32)
  return loss


CASES = [  # (B, H, W, n), stride, e, kernel's j axis (1 = shared "ws"), groups
    ((2, 6, 5, 4), 1, 4, 1, 1),
    ((4, 7, 6, 4), 2, 4, 4, 2),      # per-channel kernel, two BN groups, odd height
    ((2, 8, 8, 6), 2, 4, 1, 1),      # n = 6: channel blocks of 2
    ((2, 5, 9, 3), 1, 2, 3, 1),      # 9 columns: 16-wide tiles, 7 masked
]


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("shape,stride,e,kj,groups", CASES)
def test_forward_matches_numpy(impl, shape, stride, e, kj, groups):
  args, _ = make_inputs(0, shape, stride, e, kj, groups)
  want = numpy_forward(*args, stride, groups)
  got = dbn.d_bn_product(*(jnp.asarray(a, jnp.float32) for a in args), stride=stride,
                         groups=groups, impl=impl, interpret=True)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("shape,stride,e,kj,groups", CASES)
def test_gradients_match_float64_autodiff(impl, shape, stride, e, kj, groups):
  args, weights = make_inputs(1, shape, stride, e, kj, groups)
  with jax.enable_x64(True):
    ref = jax.grad(loss_of(functools.partial(plain, stride=stride, groups=groups),
                           [jnp.asarray(w) for w in weights]), argnums=range(5))(
                               *(jnp.asarray(a) for a in args))
    ref = [np.asarray(r) for r in ref]
  op = functools.partial(dbn.d_bn_product, stride=stride, groups=groups, impl=impl,
                         interpret=True)
  got = jax.grad(loss_of(op, [jnp.asarray(w, jnp.float32) for w in weights]),
                 argnums=range(5))(*(jnp.asarray(a, jnp.float32) for a in args))
  for name, g, r in zip(("u", "c", "kernel", "scale", "bias"), got, ref):
    assert g.shape == r.shape and g.dtype == jnp.float32, name
    err = np.abs(np.asarray(g) - r).max() / np.abs(r).max()
    assert err < 2e-5, f"d{name}: relative error {err:.1e}"


@pytest.mark.parametrize("where", dbn.DC_PASSES)
@pytest.mark.parametrize("shape,stride,e,kj,groups", CASES[:2])
def test_dc_in_either_pass_matches_float64_autodiff(monkeypatch, where, shape, stride, e,
                                                    kj, groups):
  """QLHS_DC_PASS: impl "xla" writes dc next to dx in pass 4 ("dx", the default) or in a
  fusion of its own after pass 3 ("sums"); every gradient matches float64 autodiff
  either way, and dc is computed where the setting says (a spy on the own-fusion form)."""
  monkeypatch.setenv("QLHS_DC_PASS", where)
  own = []
  real = dbn._xla_dc
  monkeypatch.setattr(dbn, "_xla_dc", lambda *a: own.append(1) or real(*a))
  test_gradients_match_float64_autodiff("xla", shape, stride, e, kj, groups)
  assert bool(own) == (where == "sums")


def bfloat16_inputs(seed, shape, stride):
  """:func:`make_inputs` (e = 4, a shared kernel, one group) as training has them: u and
  c in bfloat16, the rest and the loss weights in float32."""
  args, weights = make_inputs(seed, shape, stride, 4, 1, 1)
  dtypes = (jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.float32, jnp.float32)
  return ([jnp.asarray(a, d) for a, d in zip(args, dtypes)],
          [jnp.asarray(w, jnp.float32) for w in weights])


def test_pallas_equals_xla_in_bfloat16():
  """The two implementations run the same float32 passes: in bfloat16 (the training
  dtype) they agree to bfloat16 rounding of the stored tensors."""
  args, ws = bfloat16_inputs(2, (2, 8, 8, 8), 2)
  outs = {}
  for impl in ("xla", "pallas"):
    op = functools.partial(dbn.d_bn_product, stride=2, impl=impl, interpret=True)
    outs[impl] = (op(*args), jax.grad(loss_of(op, ws), argnums=range(5))(*args))
  for a, b in zip(jax.tree.leaves(outs["xla"]), jax.tree.leaves(outs["pallas"])):
    assert a.dtype == b.dtype
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= 2e-2 * np.abs(a).max()


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_a_kernel_rounded_to_the_compute_dtype_is_the_rounded_kernels(monkeypatch, impl):
  """QLHS_D_KERNEL=compute: with bfloat16 u and c, the outputs and all five gradients
  are, bit for bit, those of the float32 default given the kernel already rounded to
  bfloat16 (as the plain path's derivative rounds it); dL/dkernel stays float32, not
  rounded; and they differ from the default's with the kernel as it is. With float32
  inputs nothing is rounded."""
  args, ws = bfloat16_inputs(4, (2, 7, 6, 8), 1)
  op = functools.partial(dbn.d_bn_product, stride=1, impl=impl, interpret=True)
  run = lambda a: jax.tree.leaves((op(*a), jax.grad(loss_of(op, ws), argnums=range(5))(*a)))
  rounded = args[:2] + [args[2].astype(jnp.bfloat16).astype(jnp.float32)] + args[3:]
  a32 = [a.astype(jnp.float32) for a in args]
  want, as_is, want32 = run(rounded), run(args), run(a32)
  monkeypatch.setenv("QLHS_D_KERNEL", "compute")
  got, got32 = run(args), run(a32)
  for g, w in zip(got + got32, want + want32):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
  dk = np.asarray(got[3 + 2])  # (p, mean, var), then du, dc, dkernel, ...
  assert dk.dtype == np.float32 and dk.shape == args[2].shape
  assert (dk != np.asarray(jnp.asarray(dk).astype(jnp.bfloat16), np.float32)).any()
  assert any((np.asarray(a, np.float32) != np.asarray(g, np.float32)).any()
             for a, g in zip(as_is, got))


def test_wrong_arguments_are_refused(monkeypatch):
  args, _ = make_inputs(0, (2, 6, 6, 4), 1, 4, 1, 1, np.float32)
  u, c, kernel, scale, bias = (jnp.asarray(a) for a in args)
  with pytest.raises(ValueError, match="unknown d_bn_product impl"):
    dbn.d_bn_product(u, c, kernel, scale, bias, impl="triton")
  with pytest.raises(ValueError, match="do not fit"):
    dbn.d_bn_product(u, c[:, :3], kernel, scale, bias)
  with pytest.raises(ValueError, match="BatchNorm groups"):
    dbn.d_bn_product(u, c, kernel, scale, bias, groups=3)
  args6, _ = make_inputs(0, (2, 6, 6, 4), 1, 6, 1, 1, np.float32)
  with pytest.raises(ValueError, match="power-of-two expansion"):
    dbn.d_bn_product(*(jnp.asarray(a) for a in args6), impl="pallas", interpret=True)
  monkeypatch.setenv("QLHS_DC_PASS", "du")
  with pytest.raises(ValueError, match="QLHS_DC_PASS='du': choose one of"):
    jax.grad(lambda c: dbn.d_bn_product(u, c, kernel, scale, bias)[0].sum())(c)
  monkeypatch.delenv("QLHS_DC_PASS")
  monkeypatch.setattr(dbn, "plt", None)  # a JAX without Pallas's Triton backend
  with pytest.raises(ValueError, match="needs Pallas's Triton backend.*fuse_d_bn='xla'"):
    dbn.d_bn_product(u, c, kernel, scale, bias, impl="pallas", interpret=True)


@pytest.mark.parametrize("b,h,n,stride", [(256, 56, 64, 1), (256, 56, 128, 2),
                                          (256, 7, 512, 1)])
def test_pallas_kernels_lower_to_triton_for_cuda(b, h, n, stride):
  """The forward and backward lower for a CUDA device (cross-platform lowering, no GPU
  needed) at the shapes of Eq.(3) at batch 256, 224 px: stage 1, the stage-2 stride, and
  stage 4; each of the four passes is one Triton kernel."""
  from qlhs_jax.benchmarks.triton_compile import lower_for_cuda
  text = lower_for_cuda(b, h, n, stride).as_text()
  assert text.count("xla.gpu.triton") == 4
  for name in ("stats_kernel", "apply_kernel", "sums_kernel", "dx_kernel"):
    assert f"qlhs_{name}" in text, name


def test_tiling_override(monkeypatch):
  """QLHS_PALLAS_TILING changes the tiles, not the numbers; a bad value is refused."""
  args, _ = make_inputs(3, (2, 9, 7, 8), 2, 4, 1, 1, np.float32)
  args = [jnp.asarray(a) for a in args]
  run = lambda: np.asarray(dbn.d_bn_product(*args, stride=2, impl="pallas",
                                             interpret=True)[0])
  base = run()
  plan = dbn._plan((2, 9, 7, 8), 4, 2)
  assert (plan["rows"], plan["bj"], plan["warps"], plan["tc"], plan["ncb"],
          plan["stages"]) == (4, 8, 4, 4, 1, 1)  # the defaults: whole 4-wide rows
  monkeypatch.setenv("QLHS_PALLAS_TILING", "2,16,2")  # 4-wide tiles: one channel each
  plan = dbn._plan((2, 9, 7, 8), 4, 2)
  assert (plan["rows"], plan["bj"], plan["warps"]) == (2, 1, 2)
  np.testing.assert_allclose(run(), base, rtol=1e-6, atol=1e-6)
  monkeypatch.setenv("QLHS_PALLAS_TILING", "4,64,4,2,3")  # 2 columns x all 8 channels
  plan = dbn._plan((2, 9, 7, 8), 4, 2)
  assert (plan["tc"], plan["ncb"], plan["bj"], plan["nj"], plan["stages"]) == (2, 2, 8, 1, 3)
  np.testing.assert_allclose(run(), base, rtol=1e-6, atol=1e-6)
  for bad in ("4,1000,4", "4,2048", "4,2048,4,3", "4,2048,4,0,9", "4,2048,4,0,1,1"):
    monkeypatch.setenv("QLHS_PALLAS_TILING", bad)
    with pytest.raises(ValueError, match=f"QLHS_PALLAS_TILING='{bad}'.*rows,elems,warps"):
      run()


@pytest.mark.parametrize("tiling", ["2,16,2", "3,32,4,2", "1,8192,4,2,2"])
@pytest.mark.parametrize("shape,stride,e,kj,groups", [CASES[1], CASES[3]])
def test_column_and_channel_blocks_match_float64_autodiff(monkeypatch, tiling, shape,
                                                           stride, e, kj, groups):
  """Tiles that split the columns (the last column block partly outside the image), the
  channels, or both give the reference's values and gradients: the partial sums of every
  (row block, column block) pair are kept apart and the masks cover the edges."""
  monkeypatch.setenv("QLHS_PALLAS_TILING", tiling)
  plan = dbn._plan(shape, e, stride)
  assert plan["ncb"] > 1 or plan["nj"] > 1, plan  # the case splits something
  args, weights = make_inputs(4, shape, stride, e, kj, groups)
  want = numpy_forward(*args, stride, groups)
  with jax.enable_x64(True):
    ref = jax.grad(loss_of(functools.partial(plain, stride=stride, groups=groups),
                           [jnp.asarray(w) for w in weights]), argnums=range(5))(
                               *(jnp.asarray(a) for a in args))
    ref = [np.asarray(r) for r in ref]
  op = functools.partial(dbn.d_bn_product, stride=stride, groups=groups, impl="pallas",
                         interpret=True)
  args32 = [jnp.asarray(a, jnp.float32) for a in args]
  for g, w in zip(op(*args32), want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=2e-5)
  got = jax.grad(loss_of(op, [jnp.asarray(w, jnp.float32) for w in weights]),
                 argnums=range(5))(*args32)
  for name, g, r in zip(("u", "c", "kernel", "scale", "bias"), got, ref):
    err = np.abs(np.asarray(g) - r).max() / np.abs(r).max()
    assert err < 2e-5, f"d{name}: relative error {err:.1e}"


def numpy_d_transpose(dx, k9, stride, h, w):
  """D^T as a float64 scatter: every output pixel adds dx * kernel to its nine taps."""
  b, ho, wo, n, e = dx.shape
  up = np.zeros((b, h + 2 + 2 * stride, w + 2 + 2 * stride, n))
  for oy in range(ho):
    for ox in range(wo):
      for t in range(9):
        dy, dxx = divmod(t, 3)
        up[:, oy * stride + dy, ox * stride + dxx] += (dx[:, oy, ox] * k9[t]).sum(-1)
  return up[:, 1:h + 1, 1:w + 1]


@pytest.mark.parametrize("form", dbn.DU_FORMS)
@pytest.mark.parametrize("b,h,w,n,e,stride", [(2, 6, 5, 3, 4, 1), (2, 7, 6, 4, 2, 2),
                                              (1, 8, 8, 2, 4, 2), (1, 1, 1, 2, 4, 1),
                                              (1, 2, 3, 2, 4, 2)])
def test_d_transpose_forms_match_numpy(form, b, h, w, n, e, stride):
  """Both forms of pass 5 (du = D^T dx) give the float64 scatter, odd sizes and both
  strides included."""
  rng = np.random.default_rng(5)
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  dx, k9 = rng.normal(size=(b, ho, wo, n, e)), rng.normal(size=(9, n, e))
  got = dbn._d_transpose(jnp.asarray(dx, jnp.float32), jnp.asarray(k9, jnp.float32),
                         stride, (h, w), form)
  want = numpy_d_transpose(dx, k9, stride, h, w)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_du_form_override(monkeypatch):
  """QLHS_DU_FORM selects pass 5's form: the gradients stay those of float64 autodiff;
  a bad value is refused by name."""
  shape, stride, e, kj, groups = CASES[1]
  args, weights = make_inputs(6, shape, stride, e, kj, groups)
  with jax.enable_x64(True):
    ref = jax.grad(loss_of(functools.partial(plain, stride=stride, groups=groups),
                           [jnp.asarray(w) for w in weights]))(*(jnp.asarray(a) for a in args))
  for form in dbn.DU_FORMS:
    monkeypatch.setenv("QLHS_DU_FORM", form)
    op = functools.partial(dbn.d_bn_product, stride=stride, groups=groups, impl="xla")
    got = jax.grad(loss_of(op, [jnp.asarray(w, jnp.float32) for w in weights]))(
        *(jnp.asarray(a, jnp.float32) for a in args))
    err = np.abs(np.asarray(got) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max()
    assert err < 2e-5, (form, err)
  monkeypatch.setenv("QLHS_DU_FORM", "scatter")
  with pytest.raises(ValueError, match="QLHS_DU_FORM='scatter'.*gather"):
    jax.grad(loss_of(op, [jnp.asarray(w, jnp.float32) for w in weights]))(
        *(jnp.asarray(a, jnp.float32) for a in args))


@pytest.mark.parametrize("sums_form", ["xla", "pallas"])
def test_xla_statistics_from_the_tap_gram_matrix_survive_an_offset(monkeypatch, sums_form):
  """impl "xla" takes E[(D u)^2] as k^T M k, M the Gram matrix of u's taps, and part of
  dL/dkernel as sum_t' k_t' M[t, t'] - mean * sum(tap_t). Both cancel where D u is small
  against u: a zero-sum kernel on u offset by 100 standard deviations. Against float64
  the variance and the gradients stay within 1e-4 (measured: variance 3.6e-6, the plain
  float32 formula 8e-8; dL/dkernel 3.2e-6, 2.1e-6 when it was summed from dx). Pass 3's
  Pallas sums (interpreted) take sum(g * xhat) from the taps' products with g
  (``stencil.bn_sums``), which cancels likewise: dscale 3.9e-6 (the XLA form, which
  sums g * xhat: 4.1e-6)."""
  monkeypatch.setenv("QLHS_SUMS_FORM", sums_form)
  rng = np.random.default_rng(5)
  u = 100.0 + rng.standard_normal((4, 16, 16, 8))
  k = rng.standard_normal((3, 3, 1, 4))
  k -= k.mean((0, 1), keepdims=True)
  c, scale, bias = rng.standard_normal((4, 16, 16, 32)), np.ones(32), np.zeros(32)
  weights = (rng.standard_normal(c.shape), rng.standard_normal((1, 32)),
             rng.standard_normal((1, 32)))
  args = (u, c, k, scale, bias)
  with jax.enable_x64(True):
    _, mean64, var64 = dbn.reference(*(jnp.asarray(a) for a in args))
    grads64 = jax.grad(loss_of(dbn.reference, [jnp.asarray(w) for w in weights]),
                       argnums=range(5))(*(jnp.asarray(a) for a in args))
  op = functools.partial(dbn.d_bn_product, impl="xla")
  _, mean, var = op(*(jnp.asarray(a, jnp.float32) for a in args))
  grads = jax.grad(loss_of(op, [jnp.asarray(w, jnp.float32) for w in weights]),
                   argnums=range(5))(*(jnp.asarray(a, jnp.float32) for a in args))
  rel = lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()
  assert rel(var, var64) < 1e-4 and rel(mean, mean64) < 1e-4
  for name, g, g64 in zip(("u", "c", "kernel", "scale", "bias"), grads, grads64):
    assert rel(g, g64) < 1e-4, f"d{name}: relative error {rel(g, g64):.1e}"


@pytest.mark.parametrize("groups", [1, 2])
def test_xla_sums_reduce_one_stack_with_the_pieces_on_the_major_axis(groups):
  """The statistics' 54 pieces (9 taps, 45 tap products) and pass 3's 11 sums are each
  one reduction of one stack whose piece axis is the major one and is not reduced. With
  the pieces next to the channels, XLA's GPU reduction ran the statistics of a stage-1
  block 14x slower on the H100 (benchmarks/NOTES.md, experiment 11)."""
  b, h, n, e = 4, 8, 4, 2
  u = jnp.zeros((b, h, h, n), jnp.bfloat16)
  c5 = jnp.zeros((b, h, h, n, e), jnp.bfloat16)
  k9, g = jnp.zeros((9, n, e)), jnp.zeros((groups, n, e))

  def largest_reduction(f, *args):
    eqns = [q for q in jax.make_jaxpr(f)(*args).eqns if q.primitive.name == "reduce_sum"]
    q = max(eqns, key=lambda q: q.invars[0].aval.size)
    return q.invars[0].aval.shape, q.params["axes"]

  shape, axes = largest_reduction(lambda u, k9: dbn._xla_stats(u, k9, 1, groups), u, k9)
  assert shape[:2] == (54, groups) and 0 not in axes and 1 not in axes
  shape, axes = largest_reduction(
      lambda *a: dbn._xla_backward_sums(*a, 1, groups), u, c5, c5, k9, g, g, g, g)
  assert shape[:2] == (11, groups) and 0 not in axes and 1 not in axes


def float32_ops(text):
  """The float32 dot_general and convolution ops of lowered StableHLO ``text``, and
  those of them that do not ask for HIGHEST precision (XLA runs a DEFAULT one with TF32
  inputs on NVIDIA GPUs; the CPU computes float32 either way, so tests read the ops)."""
  ops = [l for l in text.splitlines()
         if ("stablehlo.dot_general" in l or "stablehlo.convolution" in l) and "xf32>" in l]
  return ops, [l.strip()[:160] for l in ops if "precision = [HIGHEST, HIGHEST]" not in l
               and "precision_config = [#stablehlo<precision HIGHEST>, #stablehlo<"
                   "precision HIGHEST>]" not in l]


PALLAS_SUMS = {"QLHS_STATS_FORM": "pallas", "QLHS_SUMS_FORM": "pallas"}  # one group


@pytest.mark.parametrize("forms,stride,groups", [({}, 1, 1), ({}, 2, 2), (PALLAS_SUMS, 1, 1),
                                                 (PALLAS_SUMS, 2, 1)])
def test_no_float32_contraction_runs_at_default_precision(monkeypatch, forms, stride, groups):
  """The per-channel contractions of the statistics (s1, s2 = k^T M k), pass 3's sum of
  g * xhat and dL/dkernel are sums of float32 products. As float32 einsums at DEFAULT
  precision, XLA compiled s2 for an NVIDIA GPU with TF32 inputs (the deviceless sm_90a
  compile showed ``inputPrecision = tf32``), which no CPU test can see: XLA:CPU computes
  float32 either way. So no float32 dot_general of the operation, forward or backward,
  may run at less than HIGHEST."""
  for var, value in forms.items():
    monkeypatch.setenv(var, value)
  b, h, n, e = 4, 6, 4, 4
  ho = (h - 1) // stride + 1
  args = (jnp.zeros((b, h, h, n), jnp.bfloat16), jnp.zeros((b, ho, ho, n * e), jnp.bfloat16),
          jnp.zeros((3, 3, 1, e)), jnp.ones(n * e), jnp.zeros(n * e))

  def loss(*a):
    p, mean, var = dbn.d_bn_product(*a, stride=stride, groups=groups, impl="xla")
    return p.astype(jnp.float32).sum() + mean.sum() + var.sum()
  text = jax.jit(jax.grad(loss, argnums=range(5))).lower(*args).as_text()
  assert "stablehlo.reduce" in text  # the operation's sums are there
  _, loose = float32_ops(text)
  assert not loose, loose


# --- where impl "xla"'s passes read u's taps (QLHS_D_TAPS) --------------------------

HAS_TRITON = importlib.util.find_spec("triton") is not None


def barriered_pads(text: str) -> int:
  """How many optimization barriers of a lowered program take a pad's result alone:
  the padded copies of u that "copy" writes (counted function by function, where the
  SSA names live)."""
  count = 0
  for func in text.split("func.func")[1:]:
    pads = set(re.findall(r"(%[\w#]+) = (?:stablehlo\.pad |call @_?pad\()", func))
    count += sum(1 for arg in re.findall(r"= stablehlo\.optimization_barrier (%[\w#]+) :",
                                         func) if arg in pads)
  return count


@pytest.mark.parametrize("taps", ["copy", "pad"])
@pytest.mark.parametrize("where", dbn.DC_PASSES)
@pytest.mark.parametrize("shape,stride,e,kj,groups", CASES[:3])
def test_either_tap_source_matches_float64(monkeypatch, taps, where, shape, stride, e, kj,
                                           groups):
  """QLHS_D_TAPS: the XLA passes read u's taps from a padded copy of u ("copy") or pad u
  inside each pass ("pad"); the outputs match NumPy and every gradient float64 autodiff
  either way (on this CPU every pass is XLA's: the statistics, pass 3's sums, dc in
  either pass), and "copy" writes one barriered copy, which every pass reads, "pad"
  none."""
  monkeypatch.setenv("QLHS_D_TAPS", taps)
  monkeypatch.setenv("QLHS_DC_PASS", where)
  test_forward_matches_numpy("xla", shape, stride, e, kj, groups)
  test_gradients_match_float64_autodiff("xla", shape, stride, e, kj, groups)
  args, weights = make_inputs(1, shape, stride, e, kj, groups, np.float32)
  op = functools.partial(dbn.d_bn_product, stride=stride, groups=groups)
  text = jax.jit(jax.grad(loss_of(op, weights), argnums=range(5))).lower(*args).as_text()
  # one copy a block: the forward's, kept for pass 3 and pass 4 (and dc's own pass)
  copies = barriered_pads(text)
  assert copies == (1 if taps == "copy" else 0), copies


KERNEL_FORMS = {"QLHS_STATS_FORM": "pallas", "QLHS_SUMS_FORM": "pallas",
                "QLHS_DU_FORM": "pallas"}


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("forms,copies", [
    (KERNEL_FORMS, 1),  # the GPU's default: the product and pass 4 read the copy
    (dict(KERNEL_FORMS, QLHS_PRODUCT_FORM="pallas"), 0),  # no XLA pass reads u's taps
])
def test_a_copy_only_where_an_xla_pass_reads_it(monkeypatch, stride, forms, copies):
  """With the Pallas kernels for some passes (interpreted here), "copy" writes the
  padded copy where an XLA pass is left to read it, and none where every pass is a
  kernel: an unread copy would still be written, held by the backward's barriers."""
  monkeypatch.setenv("QLHS_D_TAPS", "copy")
  for var, value in forms.items():
    monkeypatch.setenv(var, value)
  args, weights = make_inputs(4, (2, 8, 8, 8), stride, 4, 1, 1, np.float32)
  op = functools.partial(dbn.d_bn_product, stride=stride)
  text = jax.jit(jax.grad(loss_of(op, weights), argnums=range(5))).lower(*args).as_text()
  assert barriered_pads(text) == copies


def test_tap_sources_agree_in_bfloat16():
  """In bfloat16 (the training dtype) the two sources give the same p, du and dc bit for
  bit (the same float32 terms, added in the same order) and the same per-channel
  gradients up to the order of float32 reductions."""
  args, ws = bfloat16_inputs(3, (2, 9, 7, 8), 1)
  outs = {}
  for taps in ("copy", "pad"):
    with settings.use({"d_taps": taps}):
      op = jax.jit(dbn.d_bn_product)
      outs[taps] = (op(*args), jax.jit(jax.grad(loss_of(op, ws), argnums=range(5)))(*args))
  (fc, gc), (fp, gp) = outs["copy"], outs["pad"]
  for a, b in zip(list(fc) + list(gc[:2]), list(fp) + list(gp[:2])):  # p, mean, var, du, dc
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  for a, b in zip(gc[2:], gp[2:]):  # dkernel, dscale, dbias: float32 sums
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-6 * float(np.abs(np.asarray(b)).max()))


def test_tap_source_default_and_bad_values(monkeypatch):
  """"auto" (unset): "copy" where the program is compiled for an NVIDIA GPU
  (QLHS_PALLAS_INTERPRET=0 stands for one, as for the stencil forms), "pad" on this CPU;
  a value outside the forms is refused by name."""
  monkeypatch.delenv("QLHS_D_TAPS", raising=False)
  monkeypatch.delenv("QLHS_PALLAS_INTERPRET", raising=False)
  assert dbn.d_taps() == "pad"
  monkeypatch.setenv("QLHS_PALLAS_INTERPRET", "0")
  assert dbn.d_taps() == "copy"
  monkeypatch.setenv("QLHS_D_TAPS", "pad")
  assert dbn.d_taps() == "pad"
  monkeypatch.setenv("QLHS_D_TAPS", "margin")
  with pytest.raises(ValueError, match=r"QLHS_D_TAPS='margin': choose one of \('auto', "
                                       r"'copy', 'pad'\)"):
    dbn.d_taps()


def h100_ptx_by_entry(script: str, env: dict, dump_dir) -> dict[str, str]:
  """Runs ``script`` (a compile for an H100 without one, ``benchmarks.aot``'s device) in
  a process of its own, XLA dumping every kernel's PTX into ``dump_dir``: {entry
  function: the PTX of its module}."""
  env = dict(env, XLA_FLAGS=f"--xla_dump_to={dump_dir} --xla_dump_emitter_re=.* "
                            "--xla_gpu_dump_llvmir=true")
  env.pop("JAX_PLATFORMS", None)
  p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                     env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                         os.path.abspath(__file__)))))
  assert p.returncode == 0, p.stderr[-3000:]
  kernels = {}
  for f in glob.glob(os.path.join(str(dump_dir), "*.ptx")):
    text = open(f).read()
    kernels.update({name: text for name in re.findall(r"\.entry (\w+)\(", text)})
  return kernels


_COMPILE_PRODUCT = textwrap.dedent("""
    import numpy as np
    from qlhs_jax.benchmarks import aot
    from qlhs_jax.kernels import d_bn_product as dbn
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, SingleDeviceSharding
    dev = aot.compile_only_device()
    s = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(
        shape, dt, sharding=SingleDeviceSharding(dev))
    fwd = jax.jit(lambda u, c, k, g, b: dbn.d_bn_product(u, c, k, g, b)[0])
    with jax.set_mesh(Mesh(np.array([dev]), ("data",))):
      lowered = fwd.lower(s((8, 16, 16, 8), jnp.bfloat16),
                          s((8, 16, 16, 32), jnp.bfloat16), s((3, 3, 1, 4)), s((32,)),
                          s((32,)))
    lowered.compile(aot.GEMM_OPTIONS["triton"])
""")


@pytest.mark.skipif(not (HAS_CUDA_PLUGIN and HAS_TRITON),
                    reason="needs JAX's CUDA plugin and triton")
@pytest.mark.parametrize("taps", ["copy", "pad"])
def test_the_copy_takes_the_branches_out_of_the_h100_product(tmp_path, taps):
  """Compiled for an H100 without one (the statistics as XLA's reduction, so that the
  forward's only element-wise kernels are the product's and, with "copy", the pad's):
  with "pad" the product's kernel loads its taps behind branches (XLA's emitter checks
  the bounds of every element of a pad); with "copy" it has no branch at all, and a
  kernel of its own writes the padded copy."""
  kernels = h100_ptx_by_entry(_COMPILE_PRODUCT, dict(
      os.environ, QLHS_D_TAPS=taps, QLHS_STATS_FORM="xla", QLHS_XLA_FMA="1"), tmp_path)
  loops = {k: t for k, t in kernels.items() if k.startswith("loop_") and "pad" not in k}
  # the product: the loop kernel that loads 2-byte taps
  product = [t for t in loops.values() if "ld.global.nc.b16" in t]
  assert len(product) == 1, sorted(kernels)
  branches = len(re.findall(r"\bbra\b", product[0]))
  if taps == "copy":
    assert branches == 0 and any("pad" in k for k in kernels), (branches, sorted(kernels))
  else:
    assert branches >= 8 and not any("pad" in k for k in kernels), (branches,
                                                                    sorted(kernels))
