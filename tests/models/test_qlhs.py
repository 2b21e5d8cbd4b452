"""The QLHS network: block forms against hand-written references, modes, dtypes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlhs_jax.models import QLHSBlock, QLHSNet
from qlhs_jax.models.qlhs import FORMS

TINY = dict(widths=(8, 16), depths=(1, 2), num_classes=5, stem="small")


def randomize(tree, key, lo=-1.0, hi=1.0):
  """Uniform random values of the same shapes and dtypes (NumPy: no compilation)."""
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())
  return jax.tree.map(lambda l: jnp.asarray(rng.uniform(lo, hi, l.shape), l.dtype), tree)


def random_variables(model, x, seed=0, lo=-1.0, hi=1.0):
  """Random params in [lo, hi] (BN scales far from 0 and 1) and running statistics in
  [0.5, 1.5], of ``model``'s shapes for input ``x`` (``jax.eval_shape``: no compile)."""
  v = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  return {"params": randomize(v["params"], jax.random.PRNGKey(seed + 1), lo, hi),
          "batch_stats": randomize(v["batch_stats"], jax.random.PRNGKey(seed + 2), 0.5,
                                   1.5)}


def np_bn(z, p, st):
  return (z - st["mean"]) / np.sqrt(st["var"] + 1e-5) * p["scale"] + p["bias"]


def np_d(u, k, stride):
  """D with zero padding, NumPy loops; u (B, H, W, J, S), k (3, 3, J|1, E)."""
  from tests.models.test_layers import numpy_derivative
  return numpy_derivative(u, k, stride)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("stride,n_out", [(1, 6), (2, 12)])
def test_block_matches_numpy_reference(form, stride, n_out):
  """Eval-mode block output against an independent NumPy transcription of the
  architecture table (float64)."""
  with jax.enable_x64(True):
    e, n_in = 4, 6
    block = QLHSBlock(n_out, stride, form, e, weight_sharing=True, post_activation="none",
                      dtype=jnp.float64, param_dtype=jnp.float64)
    u = np.random.default_rng(0).standard_normal((2, 7, 7, n_in))
    v = block.init(jax.random.PRNGKey(0), jnp.asarray(u))
    p = randomize(v["params"], jax.random.PRNGKey(1))
    st = randomize(v["batch_stats"], jax.random.PRNGKey(2), 0.5, 1.5)
    got = np.asarray(block.apply({"params": p, "batch_stats": st}, jnp.asarray(u)))
    p, st = jax.tree.map(np.asarray, p), jax.tree.map(np.asarray, st)
    us = u[:, ::stride, ::stride]
    bn = lambda z, name: np_bn(z, p[f"bn_{name}"], st[f"bn_{name}"])
    k = p["d_kernel"]
    if form == "eq3":
      y = (bn(np_d(u[..., None], k, stride), "d") * (us @ p["c"])) @ p["a"]
    elif form == "eq3w":
      y = (bn(np_d((u @ p["w"])[..., None], k, stride), "d") * (us @ p["c"])) @ p["a"]
    elif form == "eq4":
      y = (us @ p["c"]) * (bn(np_d(u[..., None], k, stride), "d") @ p["a"])
    elif form == "eq5":
      prod = bn(np_d(u[..., None], k, stride), "d") * (us @ p["c"])
      g = e * n_in // n_out
      # output o sums hidden channels o*g .. o*g + g - 1
      y = np.stack([prod[..., o * g:(o + 1) * g].sum(-1) for o in range(n_out)], -1)
    elif form == "eq6":
      prod = u * bn(u @ p["c"], "c")
      y = bn(np_d(prod[..., None], k, stride), "d") @ p["a"]
    elif form == "eq7":
      c = bn(u @ p["c"], "c")
      rep = np.repeat(u, e, axis=-1)  # u_rep: channel j*e + s is u_j
      y = bn(np_d((rep * c).reshape(c.shape[:-1] + (n_in, e)), k, stride), "d") @ p["a"]
    y = bn(y, "out")
    if "shortcut" in p:
      sc = np_bn(us @ p["shortcut"]["kernel"][0, 0], p["shortcut"]["bn"],
                 st["shortcut"]["bn"])
    else:
      assert stride == 1 and n_out == n_in
      sc = u
    np.testing.assert_allclose(got, y + sc, rtol=1e-10, atol=1e-10)


def test_eq5_unstrided_block_uses_only_its_own_channel():
  """Eq.(5): output i depends on derivatives of u_i only (gradient check)."""
  block = QLHSBlock(6, 1, "eq5", 4, post_activation="none")
  u = jnp.asarray(np.random.default_rng(3).standard_normal((1, 5, 5, 6)), jnp.float32)
  v = block.init(jax.random.PRNGKey(0), u)
  v = {"params": randomize(v["params"], jax.random.PRNGKey(1)),
       "batch_stats": v["batch_stats"]}
  out_minus_shortcut = lambda x: block.apply(v, x) - x
  jac = jax.jacobian(lambda x: out_minus_shortcut(x)[0, 2, 2])(u)[:, 0]  # (6, 5, 5, 6)
  # The D part of output i touches only input channel i away from the centre pixel.
  off_centre = jnp.abs(jac).at[:, 2, 2, :].set(0).sum(axis=(1, 2))
  assert np.all(np.asarray(off_centre)[~np.eye(6, dtype=bool)] == 0)
  assert np.all(np.diag(np.asarray(off_centre)) > 0)


@pytest.mark.parametrize("form", FORMS)
def test_blocks_start_as_identity(form):
  """BN_out's scale starts at 0, so every block is its shortcut at initialisation."""
  blk = QLHSBlock(8, 1, form, 4, post_activation="none", dtype=jnp.float32)
  u = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 6, 8))
  vb = jax.jit(blk.init)(jax.random.PRNGKey(3), u)
  np.testing.assert_allclose(np.asarray(jax.jit(blk.apply)(vb, u)), np.asarray(u),
                             atol=1e-6)


def test_logits_are_float32_with_float32_parameters():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  m = QLHSNet(form="eq7", activation="none", **TINY)
  v = jax.jit(m.init)(jax.random.PRNGKey(1), x)
  logits = jax.jit(m.apply)(v, x)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 5)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v["params"]))


def test_bfloat16_compute():
  m = QLHSNet(**TINY)  # default dtype bfloat16
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  v = m.init(jax.random.PRNGKey(1), x)
  jaxpr = str(jax.make_jaxpr(lambda v: m.apply(v, x))(v))
  assert "bf16[2,16,16,32]" in jaxpr  # the hidden product runs in bfloat16
  assert m.apply(v, x).dtype == jnp.float32


@pytest.mark.parametrize("form", ["eq3", "eq7"])
def test_d_implementations_give_the_same_network(form):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 15, 15, 3))
  m = QLHSNet(form=form, dtype=jnp.float32, **TINY)
  v = m.init(jax.random.PRNGKey(1), x)
  v = {"params": randomize(v["params"], jax.random.PRNGKey(2), -0.5, 0.5),
       "batch_stats": v["batch_stats"]}
  a, sa = m.apply(v, x, train=True, mutable=["batch_stats"])
  b, sb = m.clone(d_impl="grouped").apply(v, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
  for la, lb in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    np.testing.assert_allclose(np.asarray(la), np.asarray(lb), rtol=1e-4, atol=1e-5)
  # "shifted_t" (the hand-written transpose): the same loss gradient as "shifted".
  y = jax.random.normal(jax.random.PRNGKey(3), a.shape)

  def grads(model):
    def loss(p):
      out, _ = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                           mutable=["batch_stats"])
      return (out * y).sum()
    return jax.grad(loss)(v["params"])
  # pin_hidden_layout (a physical layout, not a value): the same gradient too.
  # Absolute slack from the whole gradient's scale: bn_d's bias gradient is zero in exact
  # arithmetic (a BatchNorm follows), so both sides are float32 rounding of cancelling
  # terms, ~1e-7 (JAX 0.12 on a CPU: 1.2e-7 apart where the leaf's own scale gave 1e-7).
  g_ref = grads(m)
  scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(g_ref))
  for variant in (dict(d_impl="shifted_t"), dict(pin_hidden_layout=True)):
    for ga, gt in zip(jax.tree.leaves(g_ref), jax.tree.leaves(grads(m.clone(**variant)))):
      np.testing.assert_allclose(np.asarray(gt), np.asarray(ga), rtol=1e-4,
                                 atol=1e-5 * float(np.abs(np.asarray(ga)).max())
                                 + 1e-6 * scale)


def test_pin_hidden_layout_reaches_every_block():
  m = QLHSNet(pin_hidden_layout=True, **TINY)
  x = jnp.zeros((2, 16, 16, 3))
  v = m.init(jax.random.PRNGKey(1), x)
  text = jax.jit(lambda v: m.apply(v, x, train=True, mutable=["batch_stats"])).lower(
      v).as_text()
  assert text.count("@LayoutConstraint") == len(m.block_layout())
  assert "@LayoutConstraint" not in jax.jit(lambda v: m.clone(pin_hidden_layout=False).apply(
      v, x)).lower(v).as_text()


def test_train_mode_batch_statistics_and_groups():
  """Train mode normalises with batch statistics; bn_groups=2 normalises each half of
  the batch with its own statistics (per-replica BN) and averages them into the
  running statistics."""
  from qlhs_jax.models.common import BatchNorm
  x = np.random.default_rng(0).standard_normal((4, 3, 3, 5)).astype(np.float32) * 2 + 1
  bn = BatchNorm(use_running_average=False, groups=2)
  v = bn.init(jax.random.PRNGKey(0), x)
  y, upd = bn.apply(v, x, mutable=["batch_stats"])
  for half in (slice(0, 2), slice(2, 4)):
    h = x[half]
    want = (h - h.mean((0, 1, 2))) / np.sqrt(h.var((0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(np.asarray(y)[half], want, rtol=1e-4, atol=1e-4)
  n = 2 * 3 * 3
  mean = (x[:2].mean((0, 1, 2)) + x[2:].mean((0, 1, 2))) / 2
  var = (x[:2].var((0, 1, 2), ddof=1) + x[2:].var((0, 1, 2), ddof=1)) / 2
  np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(upd["batch_stats"]["var"]), 0.9 + 0.1 * var,
                             rtol=1e-5)
  assert n > 1
  with pytest.raises(ValueError, match="does not split into 3"):
    BatchNorm(use_running_average=False, groups=3).apply(v, x, mutable=["batch_stats"])


def test_activation_placement():
  ds = QLHSNet(placement="ds", activation="softball").block_layout()
  assert [(k, i) for k, i, *_, act in ds if act != "none"] == [(1, 0), (2, 0), (3, 0)]
  al = QLHSNet(placement="all", activation="relu").block_layout()
  assert len(al) == 16 and all(act == "relu" for *_, act in al)
  strides = [s for *_, s, _ in ds]
  assert strides.count(2) == 3


def test_bad_configuration_errors():
  x = jnp.zeros((1, 8, 8, 3))
  for kw, msg in [(dict(form="eq8"), "unknown block form 'eq8'"),
                  (dict(activation="gelu"), "unknown activation 'gelu'"),
                  (dict(placement="some"), "unknown placement 'some'"),
                  (dict(stem="big"), "unknown stem 'big'"),
                  (dict(form="eq5", expansion=3, widths=(4, 8), depths=(1, 1)),
                   "eq5 needs h")]:
    m = QLHSNet(**{**TINY, **kw})
    with pytest.raises(ValueError, match=msg):
      m.init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_gives_the_same_gradients(remat):
  """Rematerialisation changes what is stored for the backward pass, not the numbers."""
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 12, 12, 3))
  labels = jnp.arange(4) % 5
  base = QLHSNet(dtype=jnp.float32, **TINY)
  v = jax.jit(base.init)(jax.random.PRNGKey(1), x)
  v = {"params": randomize(v["params"], jax.random.PRNGKey(2), -0.5, 0.5),
       "batch_stats": v["batch_stats"]}

  def grads(model):
    def loss(p):
      logits, _ = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x,
                              train=True, mutable=["batch_stats"])
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])
    return jax.jit(jax.grad(loss))(v["params"])
  g0, g1 = grads(base), grads(base.clone(remat=remat))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="unknown remat 'some'"):
    base.clone(remat="some").init(jax.random.PRNGKey(0), x)
