"""Shared pieces of the symmetry tests: tiny models with random (not initial) weights."""

import jax
import jax.numpy as jnp
import numpy as np

from qlhs_jax.models import ResNet, registry
from qlhs_jax.symmetry import measure
from qlhs_jax.symmetry import group_for, sample

TINY = dict(widths=(4, 8), depths=(1, 2), num_classes=5, stem="small")
SIZE = 8


def tiny(name: str, **overrides):
  """A registered model at test size (MobileNetV3 has a fixed layout)."""
  if name.startswith("mobilenetv3"):
    return registry.create(name, num_classes=5, **overrides)
  if name == "resnet50":
    return ResNet(widths=(4, 8), depths=(1, 2), num_classes=5, stem="small")
  return registry.create(name, **{**TINY, **overrides})


def random_variables(model, seed: int = 0, size: int = SIZE):
  """Float64 NumPy variables of the model's shapes with random values: every weight
  and BN scale (including BN_out's, which starts at 0 and would make each block the
  identity) in [-1, 1], running variances and means in [0.5, 1.5]. Shapes come from
  ``jax.eval_shape``: nothing is compiled."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(seed)
  return {"params": jax.tree.map(lambda s: rng.uniform(-1, 1, s.shape), shapes["params"]),
          "batch_stats": jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape),
                                      shapes["batch_stats"])}


def inside_and_outside(model, variables, override=None, n=4, seed=1, float64=True,
                       size=SIZE, more=()):
  """Deviations of ``n`` elements of the group and of ``n`` sampled with ``override``
  (and with each override of ``more``), in one compiled, vmapped evaluation.

  Returns ``(inside, outside)`` maxima, ``outside`` a list when ``more`` is given."""
  dtype = jnp.float64 if float64 else jnp.float32
  overrides = ([override] if override is not None else []) + list(more)
  with jax.enable_x64(float64):
    m, folded = measure.prepare(model, variables, dtype)
    group = group_for(m)
    gs = [sample(group, seed, n, dtype=dtype)]
    gs += [sample(group, seed + 1 + i, n, override=o, dtype=dtype)
           for i, o in enumerate(overrides)]
    gs = jax.tree.map(lambda *a: jnp.concatenate(a), *gs)
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((2, size, size, 3)), dtype)
    dev = np.asarray(jax.jit(lambda f, g, x: measure.deviation(m, f, g, x))(folded, gs, x))
  dev = dev.reshape(len(overrides) + 1, n).max(axis=1)
  outside = [float(d) for d in dev[1:]]
  if not more:
    outside = outside[0] if outside else None
  return float(dev[0]), outside
