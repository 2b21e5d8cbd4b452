"""The recipe's pieces against independent formulas: schedule, optimizer, loss, sharding."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlhs_jax import steps as S
from qlhs_jax.models import QLHSNet


def timm_formula(epoch, base=0.3, epochs=50, warmup=5, warmup_lr=1e-5, min_lr=0.0):
  """timm 0.9 CosineLRScheduler._get_lr with t_in_epochs, warmup_prefix=False, one
  cycle, no noise, no k-decay, written out from its source."""
  if epoch < warmup:
    return warmup_lr + epoch * (base - warmup_lr) / warmup
  if epoch >= epochs:  # past the cycle: min_lr
    return min_lr
  return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


@pytest.mark.parametrize("epoch", [0, 1, 4, 5, 6, 17, 25, 49, 50, 60])
def test_schedule_matches_timm(epoch):
  got = float(S.timm_cosine_lr(epoch, base_lr=0.3, epochs=50))
  assert got == pytest.approx(timm_formula(epoch), rel=1e-6, abs=1e-9)


def test_schedule_values_by_hand():
  assert float(S.timm_cosine_lr(0, base_lr=0.3, epochs=50)) == pytest.approx(1e-5)
  # epoch 5: the cosine at 5/50 of its period, already past its peak: warmup overlaps.
  assert float(S.timm_cosine_lr(5, base_lr=0.3, epochs=50)) == pytest.approx(
      0.15 * (1 + math.cos(math.pi / 10)))
  assert float(S.timm_cosine_lr(25, base_lr=0.3, epochs=50)) == pytest.approx(0.15)


def test_sgd_nesterov_with_coupled_decay_matches_pytorch_formula():
  """Three steps of PyTorch's SGD(momentum=0.9, nesterov=True, weight_decay=1e-4) with
  decay off 1-D parameters, written out in NumPy."""
  rng = np.random.default_rng(0)
  params = {"kernel": rng.standard_normal((3, 4)), "bias": rng.standard_normal(4)}
  grads = [{"kernel": rng.standard_normal((3, 4)), "bias": rng.standard_normal(4)}
           for _ in range(3)]
  lrs = [0.1, 0.05, 0.2]
  tx = S.make_optimizer(1e-4, 0.9, True)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  ref = {k: v.copy() for k, v in params.items()}
  buf = {k: np.zeros_like(v) for k, v in params.items()}
  for g, lr in zip(grads, lrs):
    upd, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = jax.tree.map(lambda a, u: a - lr * u, p, upd)
    for k in ref:
      d = g[k] + (1e-4 * ref[k] if ref[k].ndim > 1 else 0)
      buf[k] = 0.9 * buf[k] + d
      ref[k] = ref[k] - lr * (d + 0.9 * buf[k])
  for k in ref:
    np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-6, atol=1e-7)


def test_weight_decay_mask():
  m = S.weight_decay_mask({"a": jnp.zeros((2, 2)), "b": jnp.zeros(2),
                           "bn": {"scale": jnp.zeros(3)}, "k": jnp.zeros((3, 3, 1, 4))})
  assert m == {"a": True, "b": False, "bn": {"scale": False}, "k": True}


def test_label_smoothing_loss():
  logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
  labels = np.array([0, 1])
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = [-(0.9 * logp[i, labels[i]] + 0.1 * logp[i].mean()) for i in range(2)]
  got = S.smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 3, 0.1)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def _tiny_setup(mesh, sync_bn, group_state_writes=True):
  model = QLHSNet(widths=(4, 8), depths=(1, 1), stem="small", num_classes=10,
                  dtype=jnp.float32, bn_groups=1 if sync_bn else mesh.size)
  tx = S.make_optimizer()
  state = S.replicate(S.create_train_state(model, tx, jax.random.PRNGKey(0), (8, 8, 3)),
                      mesh)
  step = S.jit_train_step(S.make_train_step(
      model, tx, lambda e: S.timm_cosine_lr(e, base_lr=0.1, epochs=2, warmup_epochs=0),
      num_classes=10, steps_per_epoch=4, group_state_writes=group_state_writes), mesh)
  return state, step


def test_data_parallel_first_step_equals_single_device():
  """8 CPU devices with sync BN: the same loss and update as one device with the whole
  global batch; with per-replica BN the loss differs (statistics per 2 examples)."""
  assert jax.device_count() == 8, "tests/conftest.py asks for 8 host devices"
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((16, 8, 8, 3)).astype(np.float32),
           "label": rng.integers(0, 10, 16).astype(np.int32)}
  results = {}
  for name, devices, sync in [("one", jax.devices()[:1], True),
                              ("eight", jax.devices(), True),
                              ("eight_per_replica", jax.devices(), False)]:
    mesh = S.make_mesh(devices)
    state, step = _tiny_setup(mesh, sync)
    state, m = step(state, S.shard_batch(batch, mesh))
    results[name] = (float(m["loss"]), jax.device_get(state.params))
  assert results["eight"][0] == pytest.approx(results["one"][0], rel=1e-6)
  for a, b in zip(jax.tree.leaves(results["eight"][1]), jax.tree.leaves(results["one"][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert abs(results["eight_per_replica"][0] - results["one"][0]) > 1e-4


def test_nonfinite_step_is_skipped_and_counted():
  mesh = S.make_mesh(jax.devices()[:1])
  state, step = _tiny_setup(mesh, True)
  before = jax.device_get(state.params)
  bad = {"image": np.full((8, 8, 8, 3), np.nan, np.float32),
         "label": np.zeros(8, np.int32)}
  state, m = step(state, S.shard_batch(bad, mesh))
  assert float(m["finite"]) == 0.0 and int(state.skipped) == 1 and int(state.step) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(a, b)


def _guard_tree():
  """Leaves the guard groups differently: three share last dimension 8 in float32, one
  shares it in bfloat16, a scalar, an odd width, an empty leaf."""
  rng = np.random.default_rng(0)
  return {"conv": rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
          "dense": {"kernel": rng.normal(size=(5, 8)).astype(np.float32),
                    "bias": rng.normal(size=(8,)).astype(np.float32)},
          "scale": rng.normal(size=(7,)).astype(np.float32),
          "half": jnp.asarray(rng.normal(size=(2, 8)), jnp.bfloat16),
          "scalar": np.float32(1.5),
          "empty": np.zeros((0, 3), np.float32)}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_sees_every_element_of_every_leaf(bad):
  """Against NumPy, leaf by leaf: one bad value anywhere (first, last, a random element)
  makes the guard false; none makes it true."""
  guard = jax.jit(S._all_finite)
  tree = _guard_tree()
  assert bool(guard(tree))
  rng = np.random.default_rng(1)
  leaves, treedef = jax.tree.flatten(tree)
  for i, leaf in enumerate(leaves):
    size = np.size(leaf)
    for flat in sorted({0, size - 1, int(rng.integers(size))} if size else set()):
      spoilt = [np.array(x) for x in leaves]  # copies in the leaves' dtypes
      spoilt[i].reshape(-1)[flat] = bad
      expected = all(np.isfinite(x.astype(np.float32)).all() for x in spoilt)
      assert not expected
      assert bool(guard(jax.tree.unflatten(treedef, spoilt))) == expected, (i, flat)


def test_all_finite_reduces_each_group_of_leaves_once():
  """One reduction per (last dimension, dtype) group and one over the groups' flags: the
  compiled step's guard is then ~15 kernels, not one per leaf (NOTES.md experiment 28)."""
  text = jax.jit(S._all_finite).lower(_guard_tree()).as_text()
  # groups: (8, float32) conv + kernel + bias, (7, float32), (8, bfloat16), (1, float32)
  assert text.count("stablehlo.reduce") == 4 + 1


def _keep_trees():
  """new and old: six float32 leaves of 8 values in six shapes (two groups of at most
  KEEP_GROUP_LEAVES), 8 values in bfloat16 and in int32, a scalar, 7 values, an empty
  leaf."""
  rng = np.random.default_rng(2)

  def tree():
    f32 = lambda shape: rng.normal(size=shape).astype(np.float32)
    return {"a": f32((8,)), "b": f32((2, 4)), "c": {"d": f32((4, 2)), "e": f32((1, 8))},
            "f": f32((8, 1)), "g": f32((2, 2, 2)),
            "half": jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16),
            "count": rng.integers(-9, 9, size=(2, 4)).astype(np.int32),
            "scalar": np.float32(rng.normal()), "odd": f32((7,)),
            "empty": np.zeros((0, 3), np.float32)}
  return tree(), tree()


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("keep", [True, False])
def test_keep_where_matches_numpy_leaf_by_leaf(keep, grouped):
  """Each leaf is NumPy's where of its own pair, bit for bit, in its dtype and shape;
  the grouped form's concatenations and slices must not move a value across leaves."""
  new, old = _keep_trees()
  assert S.KEEP_GROUP_LEAVES < 6  # the float32 leaves of 8 values make two groups
  got = jax.jit(functools.partial(S.keep_where, grouped=grouped))(keep, new, old)
  flat_got, treedef = jax.tree.flatten(got)
  assert treedef == jax.tree.structure(new)
  for g, a, b in zip(flat_got, jax.tree.leaves(new), jax.tree.leaves(old)):
    want = np.where(keep, np.asarray(a), np.asarray(b))
    assert g.dtype == want.dtype and g.shape == want.shape
    np.testing.assert_array_equal(np.asarray(g).reshape(-1).view(np.uint8),
                                  want.reshape(-1).view(np.uint8))
  # keep False returns the old tree: no leaf of new leaks in
  if not keep:
    assert all(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(old)) if np.size(x))


def test_keep_where_selects_once_per_group():
  """Leaves of one dtype and size share a select, at most KEEP_GROUP_LEAVES of them; the
  step's ~95 per-leaf writes become ~30 kernels (NOTES.md experiment 33)."""
  new, old = _keep_trees()
  count = lambda grouped: jax.jit(functools.partial(S.keep_where, grouped=grouped)).lower(
      True, new, old).as_text().count("stablehlo.select")
  # float32 x 8: ceil(6 / KEEP_GROUP_LEAVES) = 2; bfloat16 x 8, int32 x 8, the scalar,
  # the 7 values: 1 each; the empty leaf: none (jnp.where selects nothing there)
  assert count(True) == -(-6 // S.KEEP_GROUP_LEAVES) + 4 == 6
  assert count(False) == 10


def test_grouped_and_per_leaf_state_writes_train_alike():
  """Three steps, the second with a non-finite batch (skipped): both forms give the same
  state up to rounding. The per-leaf step donates the old state; the grouped one must
  not (XLA would copy every leaf back into the donated buffers)."""
  mesh = S.make_mesh(jax.devices()[:1])
  rng = np.random.default_rng(3)
  batches = [{"image": rng.standard_normal((8, 8, 8, 3)).astype(np.float32),
              "label": rng.integers(0, 10, 8).astype(np.int32)} for _ in range(3)]
  batches[1]["image"][0, 0, 0, 0] = np.nan
  finals = {}
  for grouped in (True, False):
    state, step = _tiny_setup(mesh, True, group_state_writes=grouped)
    for i, batch in enumerate(batches):
      before = state
      state, m = step(state, S.shard_batch(batch, mesh))
      assert float(m["finite"]) == (i != 1)
      leaf = jax.tree.leaves(before.params)[0]
      assert leaf.is_deleted() == (not grouped)
    assert int(state.skipped) == 1
    finals[grouped] = jax.device_get(state)
  # keep_where is exact (the test above); around it XLA fuses the update math
  # differently, so a few leaves differ in their last bits (on this CPU: momentum of BN
  # scales, up to 5 ulp after three steps).
  for a, b in zip(jax.tree.leaves(finals[True]), jax.tree.leaves(finals[False])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)


def test_batch_must_divide_by_devices():
  with pytest.raises(ValueError, match="does not divide by the 8 devices"):
    S.check_batch_divides(12, S.make_mesh())
