"""hidden_layout="s_major": the same network as j-major once the variables are converted
(eval, train mode, gradients, folding, the train step), and D's s-major output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlhs_jax import steps as S
from qlhs_jax.models import (QLHSBlock, QLHSNet, apply_folded, convert_hidden_layout,
                             fold_batchnorm, layers)
from qlhs_jax.models.layout import permutation

from tests.models.test_qlhs import random_variables

# Stage 1 keeps its width (n_in = n_out), stage 2 strides and doubles it: both Eq.(5)
# group shapes and both stride paths of every form.
TINY = dict(widths=(4, 8), depths=(1, 1), num_classes=5, stem="small")
FORMS = ("eq3", "eq3w", "eq4", "eq5", "eq6", "eq7")


def assert_trees_close(a, b, rtol, atol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, la), lb in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(la), np.asarray(lb), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def max_diff(a, b):
  return float(jnp.max(jnp.abs(a - b)))


def _check_same_network(form, ws, dtype, tol, grads=True):
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 3), dtype)
  labels = jnp.arange(4) % 5
  mj = QLHSNet(form=form, weight_sharing=ws, activation="softball", dtype=dtype,
               param_dtype=dtype, **TINY)
  ms = mj.clone(hidden_layout="s_major")
  vj = random_variables(mj, x, lo=-0.7, hi=0.7)
  vs = convert_hidden_layout(mj, vj, to="s_major")
  # Same shapes: parameter counts and checkpoint structure do not depend on the layout.
  assert jax.tree.map(jnp.shape, vs) == jax.tree.map(jnp.shape, vj)
  assert_trees_close(convert_hidden_layout(ms, vs, to="j_major"), vj, 0, 0)  # round trip

  # Eval mode. Eager throughout: op by op, a tiny network runs faster than it compiles.
  ev = lambda m, v: m.apply(v, x)
  ref = ev(mj, vj)
  scale = float(jnp.max(jnp.abs(ref)))
  assert max_diff(ev(ms, vs), ref) < tol * scale
  # The test can fail: the s-major model on unconverted variables is another network.
  assert max_diff(ev(ms, vj), ref) > 1e-2 * scale

  # Train mode: loss, gradients (converted back) and updated running statistics.
  def loss_fn(m, params, stats):
    logits, new = m.apply({"params": params, "batch_stats": stats}, x, train=True,
                          mutable=["batch_stats"])
    loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])
    return loss, (logits, new["batch_stats"])
  if grads:
    vg = jax.value_and_grad(loss_fn, 1, has_aux=True)
  else:  # the forward pass only: (loss, aux), None
    vg = lambda m, p, st: (loss_fn(m, p, st), None)
  (lj, (zj, sj)), gj = vg(mj, vj["params"], vj["batch_stats"])
  (ls, (zs, ss)), gs = vg(ms, vs["params"], vs["batch_stats"])
  np.testing.assert_allclose(float(ls), float(lj), rtol=tol)
  assert max_diff(zs, zj) < tol * float(jnp.max(jnp.abs(zj)))
  back = convert_hidden_layout(ms, {"batch_stats": ss}, to="j_major")
  assert_trees_close(back["batch_stats"], sj, tol, tol)
  if grads:
    back = convert_hidden_layout(ms, {"params": gs}, to="j_major")
    gscale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(gj))
    assert_trees_close(back["params"], gj, tol, tol * gscale)

  # Folding an s-major model: equals its eval mode, and is the converted j-major fold.
  fs = fold_batchnorm(ms, vs["params"], vs["batch_stats"])
  fj = fold_batchnorm(mj, vj["params"], vj["batch_stats"])
  assert fs["stage2_block0"]["d_kernel"].shape == (3, 3, 4, 4)  # per channel, (j, s)
  assert_trees_close(fs, convert_hidden_layout(mj, {"params": fj}, to="s_major")["params"],
                     tol, tol)
  folded_out = apply_folded(ms, fs, x)
  assert max_diff(folded_out, ref) < tol * scale


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("ws", [True, False])
def test_s_major_is_the_same_network(form, ws):
  _check_same_network(form, ws, jnp.float32, 1e-5)


def test_s_major_is_the_same_network_float64():
  """float64: agreement to rounding (no gradients here: they cost compilation time and
  are checked in float32 above)."""
  with jax.enable_x64(True):
    _check_same_network("eq5", True, jnp.float64, 1e-12, grads=False)


@pytest.mark.parametrize("n_in,n_out", [(8, 4), (6, 8), (4, 8)])
def test_eq5_group_sums_in_s_major(n_in, n_out):
  """Eq.(5) sums the same (j, s) sets in both layouts, also where a group covers several
  j (g = 8 > e) or splits a j's kernels unevenly (g = 3, the transposing fallback)."""
  u = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, n_in))
  bj = QLHSBlock(n_out, 1, "eq5", 4, post_activation="none")
  bs = bj.clone(hidden_layout="s_major")
  v = random_variables(bj, u, lo=-0.7, hi=0.7)
  want = bj.apply(v, u)
  got = bs.apply(convert_hidden_layout(bj, v, to="s_major"), u)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert max_diff(bs.apply(v, u), want) > 1e-2


@pytest.mark.parametrize("impl", layers.D_IMPLS)
@pytest.mark.parametrize("kj,s_in", [(1, 1), (3, 1), (1, 4), (3, 4)])
def test_derivative_s_major_is_a_permutation(impl, kj, s_in):
  """D in s-major order: input (.., S, J), output channel s*J + j, same numbers."""
  rng = np.random.default_rng(kj * 10 + s_in)
  j, e = 3, 4
  x = jnp.asarray(rng.standard_normal((2, 7, 6, j, s_in)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, kj, e)), jnp.float32)
  for stride in (1, 2):
    want = layers.derivative(x, k, stride, impl)
    got = layers.derivative(jnp.swapaxes(x, 3, 4), k, stride, impl, "s_major")
    np.testing.assert_allclose(np.asarray(got),
                               np.asarray(want)[..., permutation(j, e, "s_major")],
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="unknown hidden layout 'e_major'"):
    layers.derivative(x, k, 1, impl, "e_major")


def test_permutation():
  p = permutation(3, 2, "s_major")  # j-major (j, s): 00 01 10 11 20 21
  assert p.tolist() == [0, 2, 4, 1, 3, 5]  # s-major: s=0: j=0,1,2; s=1: j=0,1,2
  np.testing.assert_array_equal(p[permutation(3, 2, "j_major")], np.arange(6))


def run_train_steps(model, variables, batch, steps=2):
  """``steps`` jitted train steps of the harness (qlhs_jax.steps: SGD-Nesterov, weight
  decay, label smoothing, running statistics) from ``variables``; (state, losses)."""
  tx = S.make_optimizer()
  lr_fn = lambda epoch: S.timm_cosine_lr(epoch, base_lr=0.3, epochs=50, warmup_epochs=0)
  # create_train_state's fields, with our variables (its jitted init is not needed).
  state = S.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
      rng=jax.random.key_data(jax.random.PRNGKey(0)), lr_scale=jnp.ones((), jnp.float32),
      skipped=jnp.zeros((), jnp.int32))
  step = jax.jit(S.make_train_step(model, tx, lr_fn, num_classes=5))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


def run_sharded_train_steps(model, x, labels, steps=2, variables=None):
  """``steps`` train steps of the harness jitted over the 8-device data mesh (conftest's
  CPU devices), from ``create_train_state``'s initial state, or from ``variables`` with
  its other fields; (state, losses)."""
  mesh = S.make_mesh()
  assert mesh.size == 8
  batch = S.shard_batch({"image": np.asarray(x), "label": np.asarray(labels)}, mesh)
  tx = S.make_optimizer()
  lr_fn = lambda epoch: S.timm_cosine_lr(epoch, base_lr=0.3, epochs=50, warmup_epochs=0)
  state = S.create_train_state(model, tx, jax.random.PRNGKey(0), x.shape[1:])
  if variables is not None:  # copied: the step donates the state, shards and all
    variables = jax.tree.map(jnp.copy, variables)
    state = state.replace(params=variables["params"],
                          batch_stats=variables["batch_stats"],
                          opt_state=tx.init(variables["params"]))
  state = S.replicate(state, mesh)
  step = S.jit_train_step(S.make_train_step(model, tx, lr_fn, num_classes=5), mesh)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


def test_train_step_with_s_major():
  """The harness's train step (qlhs_jax.steps) gives the same losses and parameters for
  converted variables, over two steps (momentum and running statistics included)."""
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 3))
  batch = {"image": x, "label": jnp.arange(4) % 5}
  mj = QLHSNet(dtype=jnp.float32, **TINY)
  ms = mj.clone(hidden_layout="s_major")
  vj = random_variables(mj, x, lo=-0.7, hi=0.7)
  vs = convert_hidden_layout(mj, vj, to="s_major")
  sj, lj = run_train_steps(mj, vj, batch)
  ss, ls = run_train_steps(ms, vs, batch)
  np.testing.assert_allclose(ls, lj, rtol=1e-5)
  back = convert_hidden_layout(ms, {"params": ss.params, "batch_stats": ss.batch_stats},
                               to="j_major")
  assert_trees_close(back["params"], sj.params, 1e-4, 1e-5)
  assert_trees_close(back["batch_stats"], sj.batch_stats, 1e-4, 1e-5)


def test_config_and_errors():
  from qlhs_jax import config as config_lib
  from qlhs_jax import train
  from qlhs_jax.symmetry import group_for
  c = config_lib.base_config("eq3_softball_ds")
  assert train.build_model(c, 5).hidden_layout == "j_major"  # the default
  c.model_overrides.hidden_layout = "s_major"
  assert train.build_model(c, 5).hidden_layout == "s_major"
  x = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match=r"unknown hidden_layout 'e_major'.*s_major"):
    QLHSNet(hidden_layout="e_major", **TINY).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="unknown hidden layout 'x'"):
    convert_hidden_layout("eq3_softball_ds", {"params": {}}, to="x")
  with pytest.raises(NotImplementedError, match=r"convert_hidden_layout\(.*j_major"):
    group_for(QLHSNet(hidden_layout="s_major", **TINY))


def test_init_from_converts_and_resume_refuses(tmp_path):
  """init_from a j-major run into an s-major model converts the weights (equal shapes
  would load silently otherwise); resuming a run with another layout is refused."""
  from qlhs_jax import checkpoint as ckpt_lib
  from qlhs_jax import config as config_lib
  x = jnp.zeros((1, 8, 8, 3))
  mj = QLHSNet(dtype=jnp.float32, **TINY)
  ms = mj.clone(hidden_layout="s_major")
  vj = random_variables(mj, x, lo=-0.7, hi=0.7)
  tx = S.make_optimizer()
  state = S.TrainState(
      step=jnp.zeros((), jnp.int32), params=vj["params"], batch_stats=vj["batch_stats"],
      opt_state=tx.init(vj["params"]), rng=jax.random.key_data(jax.random.PRNGKey(0)),
      lr_scale=jnp.ones((), jnp.float32), skipped=jnp.zeros((), jnp.int32))
  wd = str(tmp_path / "run")
  c = config_lib.base_config("eq3_softball_ds")
  ckpt_lib.save_or_check_config(wd, c)  # hidden_layout None: j-major
  ckpts = ckpt_lib.RunCheckpoints(wd, async_save=False)
  ckpts.save(0, state, None, {"epoch": 0})
  ckpts.close()
  abstract = jax.eval_shape(lambda: state)
  params, stats = ckpt_lib.load_weights(wd, abstract, ms)
  want = convert_hidden_layout(mj, vj, to="s_major")
  assert_trees_close({"params": params, "batch_stats": stats}, want, 0, 0)
  params, _ = ckpt_lib.load_weights(wd, abstract, mj)  # same layout: as saved
  assert_trees_close(params, vj["params"], 0, 0)
  c.model_overrides.hidden_layout = "s_major"
  c.allow_config_change = True
  with pytest.raises(ValueError, match="hidden_layout='j_major'.*init_from"):
    ckpt_lib.save_or_check_config(wd, c)
