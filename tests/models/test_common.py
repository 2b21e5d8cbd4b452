"""The stem's ReLU + max-pool (``common.relu_max_pool_3x3_s2``, ``stem_pool="argmax"``,
and its first backward, ``relu_max_pool_3x3_s2_fused``) against JAX's autodiff of
``nn.max_pool(nn.relu(x))`` and a NumPy loop, ties included; BatchNorm, ReLU and the
pool as one operation (``bn_relu_max_pool_3x3_s2``, ``stem_pool="argmax_bn"``) against
the float64 formula; the ``stem_pool`` choices
give the same network; the stem's padded input channels and its space-to-depth
convolution change nothing; the convolution, BatchNorm and the pool as one operation
(``conv_bn_relu_max_pool_3x3_s2``, QLHS_STEM_TAPS=margin) against the float64 formula
and the padded form."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from qlhs_jax.models import QLHSNet, ResNet, common
from qlhs_jax.models.common import (STEM_POOLS, BatchNorm, bn_relu_max_pool_3x3_s2,
                                    max_pool_3x3_s2, relu_max_pool_3x3_s2,
                                    relu_max_pool_3x3_s2_fused)

ARGMAX_POOLS = pytest.mark.parametrize("pool", [relu_max_pool_3x3_s2,
                                                relu_max_pool_3x3_s2_fused])


def autodiff_pool(x):
  """stem_pool="autodiff": flax's max-pool after nn.relu, differentiated by JAX."""
  return max_pool_3x3_s2(nn.relu(x))


def numpy_pool(x, g):
  """Float64 loops: the window maximum of relu(x) and its gradient, sent to the first
  maximal tap in row-major window order, and nowhere when the maximum is 0."""
  b, h, w, c = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  y, dx = np.zeros((b, ho, wo, c)), np.zeros(x.shape)
  for n in range(b):
    for oy in range(ho):
      for ox in range(wo):
        for k in range(c):
          best, at = 0.0, None
          for dy in range(3):
            for dxx in range(3):
              iy, ix = 2 * oy + dy - 1, 2 * ox + dxx - 1
              if 0 <= iy < h and 0 <= ix < w and x[n, iy, ix, k] > best:
                best, at = x[n, iy, ix, k], (iy, ix)
          y[n, oy, ox, k] = best
          if at is not None:
            dx[(n,) + at + (k,)] += g[n, oy, ox, k]
  return y, dx


@ARGMAX_POOLS
@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 2), (1, 5, 4, 1), (1, 2, 2, 2),
                                   (1, 1, 1, 1), (1, 3, 6, 2)])
def test_relu_max_pool_matches_autodiff_and_numpy_with_ties(shape, pool):
  rng = np.random.default_rng(0)
  # Small integers: many ties, zeros and negatives; sums of the gradient stay exact.
  x = rng.integers(-2, 3, shape).astype(np.float32)
  g = rng.integers(-4, 5, (shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2,
                           shape[3])).astype(np.float32)
  y_ref, vjp_ref = jax.vjp(autodiff_pool, jnp.asarray(x))
  y, vjp = jax.vjp(pool, jnp.asarray(x))
  y_np, dx_np = numpy_pool(x.astype(np.float64), g.astype(np.float64))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  np.testing.assert_array_equal(np.asarray(y), y_np)
  np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]),
                                np.asarray(vjp_ref(jnp.asarray(g))[0]))
  np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), dx_np)


@ARGMAX_POOLS
def test_relu_max_pool_in_bfloat16_and_nan(pool):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 16, 16, 8)), jnp.bfloat16)
  g = jnp.asarray(rng.normal(size=(2, 8, 8, 8)), jnp.bfloat16)
  y_ref, vjp_ref = jax.vjp(autodiff_pool, x)
  y, vjp = jax.vjp(pool, x)
  dx = vjp(g)[0]
  assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
  # An input can be the maximum of up to four windows: their gradients are summed in
  # float32 (exact here) and rounded once, so dx is the float64 loop's sum rounded to
  # bfloat16. JAX's scatter rounds after every add: within bfloat16 rounding of it.
  _, dx_np = numpy_pool(np.asarray(x, np.float64), np.asarray(g, np.float64))
  np.testing.assert_array_equal(np.asarray(dx, np.float32),
                                np.asarray(jnp.asarray(dx_np, jnp.bfloat16), np.float32))
  np.testing.assert_allclose(np.asarray(dx, np.float32),
                             np.asarray(vjp_ref(g)[0], np.float32), rtol=1e-2, atol=4e-2)
  y_nan = pool(x.at[0, 3, 3, 0].set(jnp.nan))
  assert bool(jnp.isnan(y_nan[0, 1, 1, 0])) and bool(jnp.isnan(y_nan[0, 2, 2, 0]))
  assert int(jnp.isnan(y_nan).sum()) == int(jnp.isnan(autodiff_pool(
      x.at[0, 3, 3, 0].set(jnp.nan))).sum())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", [(2, 16, 16, 8), (2, 15, 9, 4), (1, 6, 7, 3)])
def test_argmax_pool_backwards_agree_bit_for_bit(shape, dtype):
  """The parity classes' backward (default) and the nine taps' transposes give the same
  bits on real-valued data: each input pixel sums the same windows' gradients in the
  same (ascending tap) order in float32 and rounds once."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=shape), dtype)
  g = jnp.asarray(rng.normal(size=(shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2,
                                   shape[3])), dtype)
  dx = jax.vjp(relu_max_pool_3x3_s2, x)[1](g)[0]
  dx_nine = jax.vjp(relu_max_pool_3x3_s2_fused, x)[1](g)[0]
  assert dx.dtype == dtype and dx.shape == x.shape
  np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(dx_nine, np.float32))
  assert float(jnp.abs(dx.astype(jnp.float32)).max()) > 0


@pytest.mark.parametrize("form", ["one", "two"])
@pytest.mark.parametrize("groups,shape", [(1, (2, 8, 8, 3)), (2, (4, 7, 9, 2)),
                                          (1, (1, 5, 4, 3)), (2, (2, 2, 1, 2))])
def test_bn_relu_max_pool_matches_the_float64_formula(groups, shape, form, monkeypatch):
  """stem_pool="argmax_bn": training-mode BatchNorm, ReLU and the max-pool as one
  operation, against the textbook BatchNorm (two means) then flax's max-pool of
  nn.relu, differentiated by JAX in float64: the pooled output and the batch
  statistics, and the gradients of y, scale and offset from cotangents on all three
  outputs. Many windows have ReLU's 0 as their maximum and send no gradient."""
  monkeypatch.setenv("QLHS_BN_STATS", form)
  rng = np.random.default_rng(3)
  c = shape[-1]
  y = rng.standard_normal(shape) * 2 + 0.5
  scale, bias = rng.uniform(0.5, 1.5, c), rng.uniform(-2.5, 0.5, c)
  pooled_shape = (shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2, c)
  cts = (rng.standard_normal(pooled_shape), rng.standard_normal((groups, c)),
         rng.standard_normal((groups, c)))

  def formula(y, scale, bias):
    yg = y.reshape((groups, -1) + y.shape[1:])
    mean = jnp.mean(yg, (1, 2, 3))
    var = jnp.mean((yg - mean[:, None, None, None]) ** 2, (1, 2, 3))
    z = ((yg - mean[:, None, None, None]) / jnp.sqrt(var[:, None, None, None] + 1e-5)
         * scale + bias).reshape(y.shape)
    return max_pool_3x3_s2(nn.relu(z)), mean, var

  with jax.enable_x64(True):
    want, vjp = jax.vjp(formula, jnp.asarray(y), jnp.asarray(scale), jnp.asarray(bias))
    want_grads = vjp(tuple(jnp.asarray(a) for a in cts))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got, vjp = jax.vjp(lambda *a: bn_relu_max_pool_3x3_s2(*a, groups), f32(y), f32(scale),
                     f32(bias))
  got_grads = jax.jit(vjp)(tuple(f32(a) for a in cts))
  assert got[0].shape == pooled_shape and got[1].shape == (groups, c)
  assert float(jnp.mean(got[0] == 0)) > 0.05  # windows whose maximum is ReLU's 0
  for a, b in zip(got + got_grads, want + want_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4)


def _classes_then_stack(idx, g, y, mul, d_s1, d_s2, groups):
  """The stem's dL/dy as ``_bn_pool_bwd`` formed it until 2026-12-05 (now
  QLHS_STEM_GRAD=classes), written out here: each parity class on the pooled grid
  (``_pool_grad_classes``), then a stack (``_interleave_classes``)."""
  b, h, w, c = y.shape
  ho, wo = g.shape[1:3]
  gf = jnp.where(idx < 9, g.astype(jnp.float32), 0.0)
  grouped = lambda v: v.reshape((groups, b // groups) + v.shape[1:])
  y6 = jnp.pad(y, ((0, 0), (0, 2 * ho - h), (0, 2 * wo - w), (0, 0))).reshape(
      b, ho, 2, wo, 2, c)
  classes = {}
  for (py, px), g_class in common._pool_grad_classes(idx, gf).items():
    dy = (grouped(g_class) * common._per_group(mul) + common._per_group(d_s1)
          + 2 * grouped(y6[:, :, py, :, px, :]).astype(jnp.float32)
          * common._per_group(d_s2))
    classes[py, px] = dy.reshape(g_class.shape).astype(y.dtype)
  return common._interleave_classes(classes, h, w)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("groups,shape", [(2, (4, 9, 7, 3)), (1, (2, 8, 8, 5)),
                                          (1, (2, 1, 2, 4)), (3, (6, 13, 10, 2))])
def test_stem_dense_gradient_is_the_classes_bit_for_bit(groups, shape, dtype):
  """``_pool_bn_grad`` (one element-wise pass over the input grid, the next window's g
  and tap read from padded copies) gives the bits of the parity classes and their stack,
  odd sizes, several groups and windows that send nowhere (tap 9) included: the same
  float32 terms in the same order, rounded once."""
  rng = np.random.default_rng(5)
  b, h, w, c = shape
  ho, wo = (h + 1) // 2, (w + 1) // 2
  y = jnp.asarray(rng.normal(size=shape), dtype)
  g = jnp.asarray(rng.normal(size=(b, ho, wo, c)), dtype)
  idx = jnp.asarray(rng.integers(0, 10, size=(b, ho, wo, c)), jnp.int8)
  mul, d_s1, d_s2 = (jnp.asarray(rng.normal(size=(groups, c)), jnp.float32)
                     for _ in range(3))
  got = jax.jit(lambda *a: common._pool_bn_grad(*common._pad_next_window(g, idx)[::-1],
                                                *a, groups))(y, mul, d_s1, d_s2)
  want = jax.jit(_classes_then_stack, static_argnums=6)(idx, g, y, mul, d_s1, d_s2, groups)
  assert got.shape == y.shape and got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("groups", [1, 2])
def test_stem_grad_forms_give_the_same_bits(groups, monkeypatch):
  """QLHS_STEM_GRAD: the operation's gradients of y, scale and offset in bfloat16, with
  the default one pass and with the classes and their stack, bit for bit; a bad value
  is refused by name."""
  rng = np.random.default_rng(6)
  y = jnp.asarray(rng.standard_normal((4, 13, 10, 3)) * 2 + 0.5, jnp.bfloat16)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, 3), jnp.float32)
  bias = jnp.asarray(rng.uniform(-1, 1, 3), jnp.float32)
  cts = (jnp.asarray(rng.standard_normal((4, 7, 5, 3)), jnp.bfloat16),
         jnp.asarray(rng.standard_normal((groups, 3)), jnp.float32),
         jnp.asarray(rng.standard_normal((groups, 3)), jnp.float32))
  grads = {}
  for form in common.STEM_GRAD_FORMS:
    monkeypatch.setenv("QLHS_STEM_GRAD", form)
    vjp = jax.vjp(lambda *a: bn_relu_max_pool_3x3_s2(*a, groups), y, scale, bias)[1]
    grads[form] = jax.jit(vjp)(cts)
  for a, b in zip(grads["pass"], grads["classes"]):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  monkeypatch.setenv("QLHS_STEM_GRAD", "stack")
  with pytest.raises(ValueError, match=r"QLHS_STEM_GRAD='stack': choose one of "
                                       r"\('pass', 'classes'\)"):
    jax.vjp(lambda *a: bn_relu_max_pool_3x3_s2(*a, groups), y, scale, bias)[1](cts)


def _conv_float64(x, k, strides=2):
  """The stem's convolution (padding k // 2) by lax in float64."""
  kh, kw = k.shape[:2]
  return lax.conv_general_dilated(x, k, (strides,) * 2, [(kh // 2,) * 2, (kw // 2,) * 2],
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("space_to_depth", [True, False])
@pytest.mark.parametrize("groups,shape", [(1, (2, 16, 16, 4)), (2, (4, 13, 9, 3)),
                                          (1, (1, 5, 4, 3)), (2, (2, 3, 2, 4))])
def test_conv_bn_relu_max_pool_matches_the_float64_formula(groups, shape, space_to_depth):
  """QLHS_STEM_TAPS=margin (the default): the stem's 7x7/2 convolution, training-mode
  BatchNorm, ReLU and the max-pool as one operation, its convolution written with a
  margin, against lax's convolution, the textbook BatchNorm (two means) and flax's
  max-pool of nn.relu, differentiated by JAX in float64: the pooled output and the batch
  statistics, and the gradients of x, the kernel, scale and offset. At odd sizes the
  margin's last row or column lies under the last windows' taps and must never be
  taken."""
  rng = np.random.default_rng(7)
  c = 6
  x = rng.standard_normal(shape)
  kern = rng.standard_normal((7, 7, shape[-1], c)) * 0.3
  scale, bias = rng.uniform(0.5, 1.5, c), rng.uniform(-2.5, 0.5, c)
  h, w = (shape[1] + 1) // 2, (shape[2] + 1) // 2
  pooled_shape = (shape[0], (h + 1) // 2, (w + 1) // 2, c)
  cts = (rng.standard_normal(pooled_shape), rng.standard_normal((groups, c)),
         rng.standard_normal((groups, c)))

  def formula(x, kern, scale, bias):
    y = _conv_float64(x, kern)
    yg = y.reshape((groups, -1) + y.shape[1:])
    mean = jnp.mean(yg, (1, 2, 3))
    var = jnp.mean((yg - mean[:, None, None, None]) ** 2, (1, 2, 3))
    z = ((yg - mean[:, None, None, None]) / jnp.sqrt(var[:, None, None, None] + 1e-5)
         * scale + bias).reshape(y.shape)
    return max_pool_3x3_s2(nn.relu(z)), mean, var

  args = (x, kern, scale, bias)
  with jax.enable_x64(True):
    want, vjp = jax.vjp(formula, *(jnp.asarray(a) for a in args))
    want_grads = vjp(tuple(jnp.asarray(a) for a in cts))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got, vjp = jax.vjp(lambda *a: common.conv_bn_relu_max_pool_3x3_s2(
      *a, 2, space_to_depth, groups), *(f32(a) for a in args))
  got_grads = jax.jit(vjp)(tuple(f32(a) for a in cts))
  assert got[0].shape == pooled_shape and got[1].shape == (groups, c)
  assert float(jnp.mean(got[0] == 0)) > 0.05  # windows whose maximum is ReLU's 0
  for a, b in zip(got + got_grads, want + want_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=3e-4, atol=3e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("space_to_depth,groups,shape", [
    (True, 1, (2, 32, 32, 4)), (True, 2, (4, 29, 17, 4)), (False, 1, (2, 29, 17, 3)),
    (False, 2, (4, 9, 10, 4)), (True, 1, (1, 3, 2, 4))])
def test_conv_bn_relu_max_pool_is_the_padded_form_bit_for_bit(space_to_depth, groups,
                                                             shape, dtype):
  """The margin form gives the bits of the convolution then
  ``bn_relu_max_pool_3x3_s2`` (the pool's -inf padding; QLHS_STEM_TAPS=pad): outputs,
  statistics and every gradient. The same convolution sums and the same float32
  arithmetic (on this CPU; a GPU's convolution of another output size may pick another
  algorithm)."""
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.standard_normal(shape), dtype)
  kern = jnp.asarray(rng.standard_normal((7, 7, shape[-1], 8)) * 0.2, dtype)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, 8), jnp.float32)
  bias = jnp.asarray(rng.uniform(-1, 0.5, 8), jnp.float32)

  def padded(x, kern, scale, bias):
    y = common.stem_conv(x, kern, 2, space_to_depth)
    return bn_relu_max_pool_3x3_s2(y, scale, bias, groups)

  margin = lambda *a: common.conv_bn_relu_max_pool_3x3_s2(*a, 2, space_to_depth, groups)
  outs = {}
  for name, f in (("pad", padded), ("margin", margin)):
    out, vjp = jax.vjp(f, x, kern, scale, bias)
    cts = tuple(jnp.asarray(np.random.default_rng(9).standard_normal(a.shape), a.dtype)
                for a in out)
    outs[name] = out + jax.jit(vjp)(cts)
  for a, b in zip(outs["margin"], outs["pad"]):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("model", [
    ResNet(widths=(8, 16), depths=(1, 1), num_classes=5, dtype=jnp.float32),
    QLHSNet(widths=(4, 8), depths=(1, 1), num_classes=5, dtype=jnp.float32)])
def test_stem_taps_forms_give_the_same_network(model, monkeypatch):
  """QLHS_STEM_TAPS: "margin" (the default) and "pad" give the same loss, gradients and
  BatchNorm statistics, with both stem convolutions and an odd image size; the margin
  form's convolution writes a row and a column more on each side (the lowering says so);
  a bad value is refused by name."""
  for conv in ("space_to_depth", "direct"):
    m = model.clone(stem_conv=conv)
    for size in (32, 29):
      x = jax.random.normal(jax.random.PRNGKey(0), (4, size, size, 3))
      labels = jnp.arange(4) % 5
      v = m.init(jax.random.PRNGKey(1), x)
      out = {}
      for form in common.STEM_TAPS_FORMS:
        monkeypatch.setenv("QLHS_STEM_TAPS", form)
        out[form] = _train_loss_and_grads(m, v, x, labels)
        text = jax.jit(lambda x: _train_loss_and_grads(m, v, x, labels)).lower(x).as_text()
        conv_out = (size + 1) // 2 + (2 if form == "margin" else 0)
        first = [l for l in text.splitlines() if "stablehlo.convolution" in l][0]
        assert f"-> tensor<4x{conv_out}x{conv_out}x{m.widths[0]}xf32>" in first, first
      for a, b in zip(jax.tree.leaves(out["margin"]), jax.tree.leaves(out["pad"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  monkeypatch.setenv("QLHS_STEM_TAPS", "edge")
  with pytest.raises(ValueError, match=r"QLHS_STEM_TAPS='edge': choose one of "
                                       r"\('margin', 'pad'\)"):
    _train_loss_and_grads(model, v, x, labels)


@pytest.mark.parametrize("groups", [1, 2])
def test_bn_relu_max_pool_in_bfloat16_is_batchnorm_then_the_pool(groups):
  """In bfloat16: the same pooled values, bit for bit, as BatchNorm then
  :func:`relu_max_pool_3x3_s2` (the same float32 arithmetic), running statistics to
  float32 rounding; the
  gradients within bfloat16 rounding of theirs (that path rounds the pool's gradient to
  bfloat16 before BatchNorm's backward)."""
  rng = np.random.default_rng(4)
  y = jnp.asarray(rng.standard_normal((4, 16, 14, 8)) * 3 + 1, jnp.bfloat16)
  g = jnp.asarray(rng.standard_normal((4, 8, 7, 8)), jnp.bfloat16)
  fused = BatchNorm(use_running_average=False, groups=groups, relu_max_pool=True,
                    dtype=jnp.bfloat16)
  plain = fused.clone(relu_max_pool=False)
  v = fused.init(jax.random.PRNGKey(0), y)
  params = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 8), jnp.float32),
            "bias": jnp.asarray(rng.uniform(-1, 1, 8), jnp.float32)}

  outs = {}
  for name, module, then in (("fused", fused, lambda o: o),
                             ("plain", plain, relu_max_pool_3x3_s2)):
    def f(y, params, module=module, then=then):
      out, new = module.apply({"params": params, "batch_stats": v["batch_stats"]}, y,
                              mutable=["batch_stats"])
      return then(out), new
    out, vjp, new = jax.vjp(f, y, params, has_aux=True)
    outs[name] = (out, new, vjp(g))
  (out_f, new_f, (dy_f, dp_f)), (out_p, new_p, (dy_p, dp_p)) = outs["fused"], outs["plain"]
  assert out_f.dtype == jnp.bfloat16 and dy_f.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out_f, np.float32), np.asarray(out_p, np.float32))
  for a, b in zip(jax.tree.leaves(new_f), jax.tree.leaves(new_p)):  # XLA's contractions
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)
  np.testing.assert_allclose(np.asarray(dy_f, np.float32), np.asarray(dy_p, np.float32),
                             rtol=2e-2, atol=2e-2)
  for k in ("scale", "bias"):
    np.testing.assert_allclose(dp_f[k], dp_p[k], rtol=1e-2, atol=1e-2)
  with pytest.raises(ValueError, match="relu_max_pool=True.*takes x in its dtype bfloat16"):
    fused.init(jax.random.PRNGKey(0), y.astype(jnp.float32))


def _train_loss_and_grads(m, v, x, labels):
  """The cross-entropy of ``m`` in train mode at ``v``'s parameters, its gradients and
  the new BatchNorm statistics: ``((loss, new), grads)``."""
  def loss_fn(params):
    logits, new = m.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                          train=True, mutable=["batch_stats"])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels]), new
  return jax.value_and_grad(loss_fn, has_aux=True)(v["params"])


@pytest.mark.parametrize("model", [
    ResNet(widths=(8, 16), depths=(1, 1), num_classes=5, dtype=jnp.float32),
    QLHSNet(widths=(4, 8), depths=(1, 1), num_classes=5, dtype=jnp.float32)])
def test_stem_pools_give_the_same_network(model):
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  labels = jnp.arange(4) % 5
  v = model.init(jax.random.PRNGKey(1), x)
  out = {}
  for pool in STEM_POOLS:
    out[pool] = _train_loss_and_grads(model.clone(stem_pool=pool), v, x, labels)
  for pool in ("argmax_bn", "argmax_fused", "autodiff"):
    for a, b in zip(jax.tree.leaves(out["argmax"]), jax.tree.leaves(out[pool])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="stem_pool"):
    model.clone(stem_pool="scatter").init(jax.random.PRNGKey(1), x)


@pytest.mark.parametrize("model", [
    ResNet(widths=(8, 16), depths=(1, 1), num_classes=5, dtype=jnp.float32),
    QLHSNet(widths=(4, 8), depths=(1, 1), num_classes=5, dtype=jnp.float32)])
def test_stem_pad_channels_gives_the_same_network(model):
  """stem_pad_channels=4 (the default) feeds the 7x7 convolution 4 channels, the fourth
  zero, and keeps the (7, 7, 3, width) kernel as the parameter: the same parameters,
  loss, gradients and BatchNorm statistics as the unpadded stem (0), train and eval."""
  from qlhs_jax.models.common import ConvNorm
  assert model.stem_pad_channels == 4
  model = model.clone(stem_conv="direct")  # the lowering below reads its input as given
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  labels = jnp.arange(4) % 5
  v = model.init(jax.random.PRNGKey(1), x)
  v0 = model.clone(stem_pad_channels=0).init(jax.random.PRNGKey(1), x)
  assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, v0)
  assert v["params"]["stem"]["kernel"].shape == (7, 7, 3, model.widths[0])
  out = {}
  for pad in (4, 0):
    m = model.clone(stem_pad_channels=pad)
    out[pad] = (_train_loss_and_grads(m, v, x, labels), m.apply(v, x))
    # What the convolution is handed: 4 input channels, or the image's 3.
    text = jax.jit(lambda x: m.apply(v, x)).lower(x).as_text()
    lhs = [l for l in text.splitlines() if "stablehlo.convolution" in l][0]
    assert f"tensor<4x32x32x{max(pad, 3)}xf32>" in lhs, lhs
  for a, b in zip(jax.tree.leaves(out[4]), jax.tree.leaves(out[0])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  grad = out[4][0][1]["stem"]["kernel"]
  assert grad.shape == (7, 7, 3, model.widths[0]) and float(jnp.abs(grad).max()) > 0
  with pytest.raises(ValueError, match="pad_in_channels=4 needs an ungrouped"):
    ConvNorm(4, (3, 3), groups=3, pad_in_channels=4).init(jax.random.PRNGKey(0), x)


def _conv_stride2_numpy(x, k):
  """The stride-2 convolution with padding k//2 (NHWC, HWIO) in float64, tap by tap."""
  kh, kw = k.shape[:2]
  b, h, w, _ = x.shape
  ho, wo = (h + 2 * (kh // 2) - kh) // 2 + 1, (w + 2 * (kw // 2) - kw) // 2 + 1
  xp = np.pad(x, ((0, 0), (kh // 2,) * 2, (kw // 2,) * 2, (0, 0)))
  out = np.zeros((b, ho, wo, k.shape[3]))
  for dy in range(kh):
    for dx in range(kw):
      patch = xp[:, dy:dy + 2 * ho - 1:2, dx:dx + 2 * wo - 1:2, :]
      out += np.einsum("bhwc,co->bhwo", patch, k[dy, dx])
  return out


@pytest.mark.parametrize("h,w,k,c", [(32, 32, 7, 4), (33, 17, 7, 3), (9, 10, 3, 2),
                                     (11, 12, 5, 4), (2, 1, 7, 3)])
def test_space_to_depth_conv_is_the_stride_2_convolution(h, w, k, c):
  """common.space_to_depth_conv against the convolution summed tap by tap in NumPy
  (float64), odd sizes and images smaller than the kernel included; its kernel gradient
  against JAX's of the direct convolution."""
  from qlhs_jax.models.common import space_to_depth_conv
  rng = np.random.default_rng(h * 100 + w)
  x, kern = rng.standard_normal((2, h, w, c)), rng.standard_normal((k, k, c, 5))
  with jax.enable_x64(True):
    got = space_to_depth_conv(jnp.asarray(x), jnp.asarray(kern))
    np.testing.assert_allclose(got, _conv_stride2_numpy(x, kern), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(got.shape)
    direct = lambda kk: jnp.sum(g * lax.conv_general_dilated(
        jnp.asarray(x), kk, (2, 2), [(k // 2, k // 2)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC")))
    blocked = lambda kk: jnp.sum(g * space_to_depth_conv(jnp.asarray(x), kk))
    np.testing.assert_allclose(jax.grad(blocked)(jnp.asarray(kern)),
                               jax.grad(direct)(jnp.asarray(kern)), rtol=1e-12, atol=1e-12)
  with pytest.raises(ValueError, match="odd kernel"):
    space_to_depth_conv(jnp.zeros((1, 8, 8, c)), jnp.zeros((4, 4, c, 5)))


@pytest.mark.parametrize("model", [
    ResNet(widths=(8, 16), depths=(1, 1), num_classes=5, dtype=jnp.float32),
    QLHSNet(widths=(4, 8), depths=(1, 1), num_classes=5, dtype=jnp.float32)])
def test_stem_conv_space_to_depth_gives_the_same_network(model):
  """stem_conv="space_to_depth" (the default) computes the 7x7/2 stem convolution as a
  4x4 stride-1 convolution of 16 channels (the image's 3, the zero fourth, on 2x2
  blocks) with the same (7, 7, 3, width) parameter: the same loss, gradients and
  BatchNorm statistics as "direct", train, eval and BN-folded; odd image sizes too."""
  from qlhs_jax.models.fold import apply_folded, fold_batchnorm
  assert model.stem_conv == "space_to_depth"
  s2d, direct = model, model.clone(stem_conv="direct")
  for size in (32, 29):
    x = jax.random.normal(jax.random.PRNGKey(0), (4, size, size, 3))
    labels = jnp.arange(4) % 5
    v = direct.init(jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, s2d.init(jax.random.PRNGKey(1), x)) == \
        jax.tree.map(jnp.shape, v)
    out = {}
    for m in (direct, s2d):
      folded = fold_batchnorm(m, v["params"], v["batch_stats"])
      out[m.stem_conv] = (_train_loss_and_grads(m, v, x, labels),
                          m.apply(v, x), apply_folded(m, folded, x))
      text = jax.jit(lambda x: m.apply(v, x)).lower(x).as_text()
      conv = [l for l in text.splitlines() if "stablehlo.convolution" in l][0]
      half = (size + 1) // 2 + 3  # the blocks of the padded image
      want = (f"tensor<4x{half}x{half}x16xf32>, tensor<4x4x16x{model.widths[0]}xf32>"
              if m is s2d else f"tensor<4x{size}x{size}x4xf32>")
      assert want in conv, conv
    for a, b in zip(jax.tree.leaves(out["direct"]), jax.tree.leaves(out["space_to_depth"])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="unknown stem_conv 'fft'"):
    model.clone(stem_conv="fft").init(jax.random.PRNGKey(1), x)
  with pytest.raises(ValueError, match="space_to_depth computes an ungrouped stride-2"):
    from qlhs_jax.models.common import ConvNorm
    ConvNorm(4, (3, 3), 1, space_to_depth=True).init(jax.random.PRNGKey(0), x)


def test_argmax_pool_train_step_on_a_sharded_mesh():
  """The stem pool, and the stem's BatchNorm, ReLU and pool as one operation
  ("argmax_bn", the default), partition over the 8-device data mesh: two train steps of
  the harness (per-replica BatchNorm) give the losses, parameters and statistics of
  JAX's own max-pool gradient. (In float32: in bfloat16 the two sum an input's gradient from up to four
  windows in different orders, and SGD at lr 0.3 amplifies that rounding.)"""
  from tests.models.test_hidden_layout import assert_trees_close, run_sharded_train_steps
  x = jax.random.normal(jax.random.PRNGKey(4), (8, 32, 32, 3))
  base = ResNet(widths=(8, 16), depths=(1, 1), num_classes=5, bn_groups=8,
                dtype=jnp.float32)
  out = {pool: run_sharded_train_steps(base.clone(stem_pool=pool), x, np.arange(8) % 5)
         for pool in ("argmax_bn", "argmax", "autodiff")}
  for pool in ("argmax_bn", "argmax"):
    np.testing.assert_allclose(out[pool][1], out["autodiff"][1], rtol=1e-5)
    assert_trees_close(out[pool][0].params, out["autodiff"][0].params, 1e-4, 1e-5)
    assert_trees_close(out[pool][0].batch_stats, out["autodiff"][0].batch_stats, 1e-4, 1e-5)


def test_sums_and_squares_is_one_reduction_with_the_formulas_derivatives():
  """``common.sums_and_squares``: sum(x) and sum(x * x) from one variadic reduce (what
  makes the compiled BatchNorm read x once), against NumPy in float64; its first and
  second derivatives against JAX's of the two plain sums."""
  from qlhs_jax.models.common import sums_and_squares
  x = np.random.default_rng(1).standard_normal((2, 3, 4, 5))
  with jax.enable_x64(True):
    s, q = sums_and_squares(jnp.asarray(x), (1, 2))
    np.testing.assert_allclose(s, x.sum((1, 2)), rtol=1e-13)
    np.testing.assert_allclose(q, (x * x).sum((1, 2)), rtol=1e-13)
    mix = lambda s, q: jnp.sum(jnp.sin(s) * jnp.cos(q))
    f = lambda x: mix(*sums_and_squares(x, (1, 2)))
    g = lambda x: mix(x.sum((1, 2)), (x * x).sum((1, 2)))
    np.testing.assert_allclose(jax.grad(f)(x), jax.grad(g)(x), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(jax.hessian(f)(x[:1, :2]), jax.hessian(g)(x[:1, :2]),
                               rtol=1e-12, atol=1e-13)
  jaxpr = str(jax.make_jaxpr(lambda x: sums_and_squares(x, (0, 1, 2)))(x))
  assert "reduce_sum" not in jaxpr and jaxpr.count(" reduce[") == 1, jaxpr


@pytest.mark.parametrize("form", ["one", "two"])
@pytest.mark.parametrize("groups", [1, 2])
def test_batchnorm_train_gradients_match_the_float64_formula(groups, form, monkeypatch):
  """Training-mode BatchNorm, its statistics from one reduction (the default) or two
  (QLHS_BN_STATS=two), against the textbook formula with two means, differentiated by
  JAX in float64: output and input, scale and offset gradients."""
  from qlhs_jax.models.common import BatchNorm
  monkeypatch.setenv("QLHS_BN_STATS", form)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((4, 3, 3, 5)) * 2 + 1
  w = rng.standard_normal(x.shape)  # a fixed readout, so that every gradient is nonzero
  bn = BatchNorm(use_running_average=False, groups=groups)
  v = bn.init(jax.random.PRNGKey(0), x.astype(np.float32))
  p = {"scale": rng.uniform(0.5, 1.5, 5), "bias": rng.uniform(-1, 1, 5)}

  def ours(x, p):
    y, _ = bn.apply({"params": p, "batch_stats": v["batch_stats"]}, x,
                    mutable=["batch_stats"])
    return jnp.sum(jnp.tanh(y) * w)

  def formula(x, p):
    xg = x.reshape((groups, -1) + x.shape[1:])
    mean = jnp.mean(xg, (1, 2, 3), keepdims=True)
    var = jnp.mean(xg * xg, (1, 2, 3), keepdims=True) - mean * mean
    y = ((xg - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape) * p["scale"] + p["bias"]
    return jnp.sum(jnp.tanh(y) * w)

  with jax.enable_x64(True):
    want = jax.value_and_grad(formula, argnums=(0, 1))(jnp.asarray(x), p)
  x32, p32 = x.astype(np.float32), jax.tree.map(lambda a: a.astype(np.float32), p)
  got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(x32, p32)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4)


def test_bn_stats_form_is_checked(monkeypatch):
  from qlhs_jax.models.common import BatchNorm
  monkeypatch.setenv("QLHS_BN_STATS", "three")
  with pytest.raises(ValueError, match=r"QLHS_BN_STATS='three': choose one of \('one', "
                                       r"'two'\)"):
    BatchNorm(use_running_average=False).init(jax.random.PRNGKey(0), jnp.ones((2, 3)))
