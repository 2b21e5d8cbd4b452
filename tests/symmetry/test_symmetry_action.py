"""act: sampled elements keep the logits (float64 and float32); elements outside the
declared group change them; the action composes. Independent check: logits of the
folded model before and after, on random weights."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlhs_jax.models import QLHSNet, registry
from qlhs_jax.models.layers import ACTIVATIONS
from qlhs_jax.models.qlhs import FORMS
from qlhs_jax.symmetry import act, check, compose, group_for, identity, inverse, sample
from qlhs_jax.symmetry import measure

from tests.kernels.test_d_bn_product import float32_ops
from tests.symmetry.symmetry_helpers import (SIZE, TINY, inside_and_outside,
                                             random_variables, tiny)

INSIDE64, INSIDE32, OUTSIDE = 1e-10, 1e-4, 1e-3
# MobileNetV3 (fixed layout, up to 960 hidden channels) is checked in one test of its
# own, with all its elements in one compiled evaluation.
QLHS_AND_RESNET = [n for n in registry.names() if not n.startswith("mobilenet")]


@pytest.mark.parametrize("name", QLHS_AND_RESNET)
def test_registered_models_float64(name):
  """Elements of the declared group keep the logits to 1e-10; generic invertible
  matrices in every matrix slot (outside the group for every model: at least the
  stem's ReLU restricts stage 1) change them."""
  m = tiny(name)
  inside, outside = inside_and_outside(m, random_variables(m), override="GL")
  assert inside < INSIDE64, inside
  assert outside > OUTSIDE, outside


@pytest.mark.parametrize("name", QLHS_AND_RESNET)
def test_registered_models_float32(name):
  m = tiny(name)
  dev = check(m, random_variables(m), 3, n=4, image_size=SIZE)
  assert dev < INSIDE32, dev


@pytest.mark.parametrize("form,activation", list(itertools.product(FORMS, ACTIVATIONS)))
def test_every_form_and_activation(form, activation):
  """Every block form with every activation, alternating placement and weight
  sharing (the folded form is per-channel either way)."""
  i = FORMS.index(form) + ACTIVATIONS.index(activation)
  m = QLHSNet(form=form, activation=activation, placement=("all", "ds")[i % 2],
              weight_sharing=bool(i % 3), **TINY)
  inside, outside = inside_and_outside(m, random_variables(m, seed=i), override="GL")
  assert inside < INSIDE64, inside
  assert outside > OUTSIDE, outside


@pytest.mark.parametrize("model,outside,inside", [
    # The literal Eq.(3) is not closed under GL of a stream its D reads (symmetry.md
    # 2b), with no activation at all ...
    (QLHSNet(form="eq3", activation="none", **TINY), {"stage2": "GL"}, None),
    # ... nor under the rotations softball allows; eq3w is closed under both.
    (QLHSNet(form="eq3", activation="softball", **TINY), {"stage2": "O"}, None),
    (QLHSNet(form="eq3w", activation="none", **TINY), {"stage1": "GL"}, {"stage2": "GL"}),
    (QLHSNet(form="eq3w", activation="softball", **TINY), {"stage2": "GL"},
     {"stage2": "O"}),
    # ReLU: no mixing, no negative scalings; hardtanh: no scalings at all.
    (QLHSNet(form="eq3w", activation="relu", placement="all", **TINY), {"stage2": "MONO"},
     None),
    (QLHSNet(form="eq3w", activation="hardtanh", **TINY), {"stage2": "POSMONO"}, None),
    (QLHSNet(form="eq6", activation="none", **TINY), {"stage2": "GL"}, {"stage2": "MONO"}),
    (tiny("resnet50"), {"stage1_block0/h1": "GL"}, None),
], ids=["eq3-GL", "eq3-softball-O", "eq3w-stem", "eq3w-softball", "relu-signs",
        "hardtanh-scales", "eq6-GL", "resnet-hidden"])
def test_targeted_elements_outside_and_inside(model, outside, inside):
  v = random_variables(model)
  _, out = inside_and_outside(model, v, override=outside)
  assert out > OUTSIDE, out
  if inside is not None:
    # An override that stays inside the declared group must keep the logits.
    _, ok = inside_and_outside(model, v, override=inside, seed=5)
    assert ok < INSIDE64, ok


def test_imagenet_stem_with_max_pool():
  """Stage 1's positive monomials commute with the stem's ReLU and max-pool; mixing
  does not."""
  m = QLHSNet(form="eq3w", activation="none", **{**TINY, "stem": "imagenet"})
  inside, outside = inside_and_outside(m, random_variables(m, size=16),
                                       override={"stage1": "GL"}, size=16)
  assert inside < INSIDE64 and outside > OUTSIDE, (inside, outside)


def test_mobilenetv3():
  """Declared group: float64 and float32; outside: generic matrices everywhere, and
  scalings of a hard-swish block's hidden layer (only permutations commute with
  hard-swish); inside: GL on a linear bottleneck."""
  m = tiny("mobilenetv3_large_100")
  v = random_variables(m)
  inside, (generic, scaled, bottleneck) = inside_and_outside(
      m, v, n=2, more=("GL", {"block6/mid": "POSMONO"}, {"segment1": "GL"}))
  assert inside < INSIDE64 and bottleneck < INSIDE64, (inside, bottleneck)
  assert generic > OUTSIDE and scaled > OUTSIDE, (generic, scaled)
  assert check(m, v, 3, n=2, image_size=SIZE) < INSIDE32


def _tree_close(a, b, rtol=1e-10):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    scale = max(float(jnp.max(jnp.abs(y))), 1e-300)
    err = float(jnp.max(jnp.abs(x - y))) / scale
    assert err < rtol, (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("name", ["eq3_softball_ds", "eq3w_none", "eq4_softball_ds",
                                  "eq5_softball_ds", "eq6_softball_ds",
                                  "eq7_nows_x6_softball_ds", "resnet50"])
def test_action_composes(name):
  """act(g2, act(g1, p)) == act(compose(g2, g1), p); the inverse undoes g; the
  identity does nothing. Parameters compared directly, float64."""
  with jax.enable_x64(True):
    m, folded = measure.prepare(tiny(name), random_variables(tiny(name)), jnp.float64)
    group = group_for(m)
    g1, g2 = sample(group, 1), sample(group, 2)

    @jax.jit
    def run(g1, g2, p):
      return (act(g2, act(g1, p)), act(compose(g2, g1), p),
              act(inverse(g1), act(g1, p)), act(identity(group), p),
              act(compose(inverse(g1), g1), p))
    twice, composed, undone, same, trivial = run(g1, g2, folded)
    _tree_close(twice, composed)
    _tree_close(undone, folded)
    _tree_close(same, folded, rtol=1e-15)
    _tree_close(trivial, folded)
    # and g really moves the parameters
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), composed, folded)
    assert max(jax.tree.leaves(moved)) > 1e-2


def test_act_is_vmappable_over_parameters_and_elements():
  m = QLHSNet(form="eq3w", activation="none", dtype=jnp.float32, **TINY)
  v = random_variables(m)
  _, folded = measure.prepare(m, v, jnp.float32)
  group = group_for(m)
  gs = sample(group, 0, 3)
  stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a, -a]), folded)
  out = jax.jit(jax.vmap(act))(gs, stacked)
  one = jax.jit(act)(jax.tree.map(lambda a: a[1], gs), jax.tree.map(lambda a: a[1], stacked))
  np.testing.assert_allclose(np.asarray(out["head"]["kernel"][1]),
                             np.asarray(one["head"]["kernel"]), rtol=1e-5)


def test_sample_respects_the_declared_kinds():
  group = group_for(tiny("eq5_softball_ds"))
  g = sample(group, 0)
  t1, t2 = (np.asarray(t) for t in g.stream)
  s1, s2 = np.argmax(np.abs(t1), 0), np.argmax(np.abs(t2), 0)
  assert np.all(t1[s1, range(4)] > 0)                      # positive monomial
  assert np.count_nonzero(t1) == 4 and np.count_nonzero(t2) == 8
  np.testing.assert_array_equal(np.abs(t2[s2, range(8)]), 1)   # signed permutation
  np.testing.assert_array_equal(s2, (s1[:, None] * 2 + np.arange(2)).ravel())  # tied
  o = np.asarray(sample(group_for(tiny("eq3w_softball_ds")), 0).stream[1])
  np.testing.assert_allclose(o @ o.T, np.eye(8), atol=1e-6)
  batch = sample(group, 0, n=5)
  assert batch.stream[1].shape == (5, 8, 8)


@pytest.mark.parametrize("name", ["eq3w_none", "resnet50"])
def test_float32_tools_ask_for_float32_precision(name):
  """A float32 action, composition, Lie-algebra exponential and check must not run at
  DEFAULT precision, which XLA computes with TF32 inputs on NVIDIA GPUs (bfloat16
  passes on TPUs): a float32 check there would measure ~1e-3, not the symmetry. The CPU
  computes float32 at either precision, so the tests read the lowered ops."""
  from qlhs_jax.symmetry.sparsify import algebra_zeros, exp_element
  m, folded = measure.prepare(tiny(name), random_variables(tiny(name)), jnp.float32)
  group = group_for(m)
  g1, g2 = sample(group, 1), sample(group, 2)
  x = jnp.zeros((2, SIZE, SIZE, 3))
  theta = jax.tree.map(lambda a: a + 0.1, algebra_zeros(group))
  checked = 0
  for fn, args in ((act, (g1, folded)), (compose, (g2, g1)),
                   (lambda t: exp_element(group, t).stream, (theta,)),
                   (lambda f, g, x: measure.deviation(m, f, g, x),
                    (folded, jax.tree.map(lambda a: a[None], g1), x))):
    ops, loose = float32_ops(jax.jit(fn).lower(*args).as_text())
    assert not loose, loose
    checked += len(ops)
  assert checked > 10, checked


def test_weak_symmetry_measures_ask_for_float32_precision():
  """The weak-symmetry search's element (expm of its generators times the base) and its
  logit error, as above: float32 at HIGHEST."""
  from qlhs_jax.symmetry import weak
  from qlhs_jax.symmetry.sparsify import algebra_zeros
  m, folded = measure.prepare(tiny("eq3_softball_ds"),
                              random_variables(tiny("eq3_softball_ds")), jnp.float32)
  group = group_for(m)
  stages = weak.gap_stages(group)
  direction = {k: jnp.ones((group.stages[k].size,) * 2) for k in stages}
  free = algebra_zeros(group)
  element = lambda d, f: weak._element(group, stages, d, f, 0.1, jnp.float32)
  x = jnp.zeros((2, SIZE, SIZE, 3))
  checked = 0
  for fn, args in ((element, (direction, free)),
                   (lambda f, x: weak.rel_error(m, folded, f, x), (folded, x))):
    ops, loose = float32_ops(jax.jit(fn).lower(*args).as_text())
    assert not loose, loose
    checked += len(ops)
  assert checked > 10, checked
