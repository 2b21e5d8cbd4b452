"""Sparsification pieces: pruning, the Lie-algebra parametrisation, the L1 measure."""

import jax
import jax.numpy as jnp
import numpy as np

from qlhs_jax.models import registry
from qlhs_jax.symmetry import act, group_for, measure
from qlhs_jax.symmetry import sparsify as sp

from tests.symmetry.symmetry_helpers import TINY, random_variables


def _folded(name="eq3w_none"):
  m = registry.create(name, **TINY)
  return measure.prepare(m, random_variables(m), jnp.float32)


def test_prune_keeps_the_largest_entries_of_each_1x1_map():
  _, folded = _folded()
  pruned = sp.prune(folded, 0.3)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(folded)[0],
                          jax.tree.leaves(pruned)):
    a, b = np.asarray(a), np.asarray(b)
    if sp.is_1x1(path, a):
      keep = int(np.ceil(0.3 * a.size))
      assert np.count_nonzero(b) == keep
      assert np.abs(a[b == 0]).max() <= np.abs(a[b != 0]).min()
      np.testing.assert_array_equal(b[b != 0], a[b != 0])
    else:
      np.testing.assert_array_equal(a, b)       # D, stem, head, biases untouched
  names = {k.split("'")[-2] for k in sp.one_by_one(folded)}
  assert names == {"a", "c", "w", "kernel"}       # kernel: the 1x1 shortcut
  assert abs(sp.kept_fraction(pruned) - 0.3) < 0.01


def test_exp_element_is_a_group_element_with_its_inverse():
  with jax.enable_x64(True):
    m, folded = measure.prepare(registry.create("eq3w_softball_ds", **TINY),
                                random_variables(registry.create("eq3w_softball_ds",
                                                                 **TINY)), jnp.float64)
    group = group_for(m)
    theta = sp.algebra_zeros(group, jnp.float64)
    rng = np.random.default_rng(0)
    theta = jax.tree.map(lambda z: jnp.asarray(0.3 * rng.standard_normal(z.shape)), theta)
    g = jax.jit(lambda t: sp.exp_element(group, t, jnp.float64))(theta)
    for t, ti in zip(g.stream, g.stream_inv):
      np.testing.assert_allclose(np.asarray(t @ ti), np.eye(len(t)), atol=1e-12)
    o = np.asarray(g.stream[1])                    # stage 2: O(8) under softball
    np.testing.assert_allclose(o @ o.T, np.eye(8), atol=1e-12)
    assert np.abs(o - np.eye(8)).max() > 0.05
    # The measure is 1 at the identity and moves with theta.
    ref = float(jax.jit(sp.l1_measure)(folded, folded))
    moved = float(jax.jit(lambda g, f: sp.l1_measure(act(g, f), f))(g, folded))
    assert ref == 1.0 and abs(moved - 1) > 1e-3


def test_diagonal_ablation_has_no_mixing_coordinates():
  group = group_for(registry.create("eq3w_none", **TINY))
  full, diag = sp.algebra_zeros(group), sp.algebra_zeros(group, mixing=False)
  assert full["stream"]["stage2"].shape == (8, 8)            # GL(8)
  assert "stage2" not in diag["stream"]
  assert diag["stream"]["stage1"].shape == (4,)              # positive diagonal
  # The tori are in both.
  assert jax.tree.map(jnp.shape, diag["hidden"]) == jax.tree.map(jnp.shape, full["hidden"])
