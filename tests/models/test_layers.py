"""D (both implementations) and the activations against plain NumPy references."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlhs_jax.models import layers


def numpy_derivative(x, kernel, stride):
  """Loops over pixels: out[b, y, x, j, s] = sum K[dy, dx, j|0, s] * x_pad[b, y*st+dy,
  x*st+dx, j, s|0] with zero padding 1, in float64."""
  b, h, w, j, s_in = x.shape
  e = kernel.shape[-1]
  xp = np.zeros((b, h + 2, w + 2, j, s_in))
  xp[:, 1:-1, 1:-1] = x
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  k = np.broadcast_to(kernel, (3, 3, j, e))
  out = np.zeros((b, ho, wo, j, e))
  for yy, xx, dy, dx in itertools.product(range(ho), range(wo), range(3), range(3)):
    out[:, yy, xx] += k[dy, dx] * xp[:, yy * stride + dy, xx * stride + dx]
  return out.reshape(b, ho, wo, j * e)


@pytest.mark.parametrize("impl", layers.D_IMPLS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(7, 7), (8, 6), (5, 9)])
@pytest.mark.parametrize("shared,s_in", [(True, 1), (False, 1), (True, 4), (False, 4)])
def test_derivative_matches_numpy(impl, stride, hw, shared, s_in):
  rng = np.random.default_rng(hash((impl, stride, hw, shared, s_in)) % 2**32)
  j, e = 3, 4
  x = rng.standard_normal((2,) + hw + (j, s_in))
  kernel = rng.standard_normal((3, 3, 1 if shared else j, e))
  got = layers.derivative(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32),
                          stride, impl)
  want = numpy_derivative(x, kernel, stride)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", layers.D_IMPLS)
def test_pinned_derivative_keeps_its_values_and_asks_for_row_major(impl):
  """pin=True changes only the physical layout XLA may choose: the values (and the
  gradients) stay, and the lowered program carries a row-major LayoutConstraint."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 7, 6, 3, 1)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 1, 4)), jnp.float32)
  got = layers.derivative(x, k, 2, impl, pin=True)
  np.testing.assert_allclose(np.asarray(got), numpy_derivative(np.asarray(x), np.asarray(k), 2),
                             rtol=1e-5, atol=1e-5)
  loss = lambda x, k, pin: (layers.derivative(x, k, 1, impl, pin=pin) ** 2).sum()
  for a, b in zip(jax.grad(loss, (0, 1))(x, k, True), jax.grad(loss, (0, 1))(x, k, False)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  text = lambda pin: jax.jit(lambda x, k: layers.derivative(x, k, 1, impl, pin=pin)).lower(
      x, k).as_text()
  pinned = [l for l in text(True).splitlines() if "@LayoutConstraint" in l]
  assert len(pinned) == 1 and "result_layouts = [dense<[3, 2, 1, 0]>" in pinned[0]
  assert "@LayoutConstraint" not in text(False)


def test_both_impls_agree_in_float64():
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((2, 10, 11, 5, 1)))
    k = jnp.asarray(rng.standard_normal((3, 3, 1, 6)))
    for stride in (1, 2):
      a = layers.derivative(x, k, stride, "shifted")
      b = layers.derivative(x, k, stride, "grouped")
      assert a.dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["j_major", "s_major"])
@pytest.mark.parametrize("stride,kj,s_in", list(itertools.product((1, 2), (1, 3), (1, 4))))
def test_shifted_t_gradients_are_autodiffs_in_float64(layout, stride, kj, s_in):
  """"shifted_t" has the forward of "shifted" (bit for bit) and its hand-written
  backward gives autodiff's gradients of "shifted" for the input and the kernel."""
  rng = np.random.default_rng(stride * 100 + kj * 10 + s_in)
  j, e = 3, 4
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((2, 7, 6, j, s_in)))
    if layout == "s_major":
      x = jnp.swapaxes(x, 3, 4)
    k = jnp.asarray(rng.standard_normal((3, 3, kj, e)))
    w = jnp.asarray(rng.standard_normal((2, (7 - 1) // stride + 1, (6 - 1) // stride + 1,
                                         j * e)))

    def loss(x, k, impl):
      return (layers.derivative(x, k, stride, impl, layout) * w).sum()
    want = jax.grad(loss, (0, 1))(x, k, "shifted")
    got = jax.grad(loss, (0, 1))(x, k, "shifted_t")
    np.testing.assert_array_equal(np.asarray(layers.derivative(x, k, stride, "shifted_t",
                                                               layout)),
                                  np.asarray(layers.derivative(x, k, stride, "shifted",
                                                               layout)))
    for g, r in zip(got, want):
      assert g.dtype == jnp.float64 and g.shape == r.shape
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-12, atol=1e-12)


def test_stride_two_samples_the_subsampled_grid():
  # A kernel that is 1 at the centre tap copies u onto the strided grid u[::2, ::2].
  x = jnp.arange(2 * 7 * 6 * 3, dtype=jnp.float32).reshape(2, 7, 6, 3, 1)
  k = jnp.zeros((3, 3, 1, 1)).at[1, 1].set(1.0)
  for impl in layers.D_IMPLS:
    out = layers.derivative(x, k, 2, impl)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(layers.subsample(x[..., 0], 2)))


def test_derivative_rejects_bad_shapes():
  with pytest.raises(ValueError, match="rank 5"):
    layers.derivative(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 1, 2)))
  with pytest.raises(ValueError, match="does not fit"):
    layers.derivative(jnp.zeros((1, 4, 4, 3, 1)), jnp.zeros((3, 3, 2, 2)))
  with pytest.raises(ValueError, match="unknown D implementation"):
    layers.derivative(jnp.zeros((1, 4, 4, 3, 1)), jnp.zeros((3, 3, 1, 2)), impl="fft")


def test_activations_match_formulas():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((4, 3, 16)) * 3
  r = np.sqrt(16)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  want = {
      "relu": np.maximum(x, 0),
      "hardtanh": np.clip(x, -1, 1),
      "hardball": np.where(norm < r, x, r * x / norm),
      "softball": x / np.sqrt(1 + norm**2 / r**2),
      "none": x,
  }
  for name, ref in want.items():
    got = layers.activation(jnp.asarray(x, jnp.float32), name)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6, err_msg=name)
  # hardball/softball keep every output inside the ball of radius sqrt(n).
  for name in ("hardball", "softball"):
    out = np.asarray(layers.activation(jnp.asarray(x * 100, jnp.float32), name))
    assert np.all(np.linalg.norm(out, axis=-1) <= r * (1 + 1e-5))


def test_ball_activations_have_finite_gradients_at_zero():
  for name in ("hardball", "softball"):
    g = jax.grad(lambda v: jnp.sum(layers.activation(v, name)))(jnp.zeros((2, 8)))
    np.testing.assert_allclose(np.asarray(g), 1.0)


def test_ball_activations_keep_bfloat16_and_rotate():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((5, 8))
  q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
  for name in ("hardball", "softball"):
    assert layers.activation(jnp.asarray(x, jnp.bfloat16), name).dtype == jnp.bfloat16
    a = np.asarray(layers.activation(jnp.asarray(x @ q.T, jnp.float32), name))
    b = np.asarray(layers.activation(jnp.asarray(x, jnp.float32), name)) @ q.T
    np.testing.assert_allclose(a, b, atol=1e-5)  # equivariant under rotations


def test_unknown_activation():
  with pytest.raises(ValueError, match="unknown activation 'gelu'"):
    layers.activation(jnp.zeros(3), "gelu")


def test_tap_products_sum_reduces_one_stack_with_the_taps_on_the_major_axis():
  """shifted_t's kernel gradient sums the nine tap products as one stack whose tap axis
  is the major one and is not reduced (next to the channels, XLA's GPU reduction runs
  the pieces' branches one after another: benchmarks/NOTES.md, experiment 11); the
  values are those of nine separate float64 sums."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 7, 6, 3, 1))
  g = rng.standard_normal((2, 4, 3, 3, 4))
  eqns = [q for q in jax.make_jaxpr(lambda x, g: layers.tap_products_sum(x, g, 2))(
      jnp.zeros(x.shape), jnp.zeros(g.shape)).eqns if q.primitive.name == "reduce_sum"]
  q = max(eqns, key=lambda q: q.invars[0].aval.size)
  assert q.invars[0].aval.shape[0] == 9 and 0 not in q.params["axes"]
  with jax.enable_x64(True):
    got = layers.tap_products_sum(jnp.asarray(x), jnp.asarray(g), 2)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))
  want = np.stack([(xp[:, dy:dy + 7:2, dx:dx + 6:2] * g).sum((0, 1, 2))
                   for dy in range(3) for dx in range(3)])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
