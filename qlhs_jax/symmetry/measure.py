"""Measure a symmetry: logits before and after ``act``, over many sampled elements.

``check(model, variables, key, n)`` folds the BatchNorms, samples ``n`` elements of
``group_for(model)``, applies them all at once under ``jax.vmap`` and returns
``max_g max|f(g.theta, x) - f(theta, x)| / max|f(theta, x)|`` (symmetry.md 4).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qlhs_jax.models.fold import apply_folded, fold_batchnorm
from qlhs_jax.symmetry.action import act
from qlhs_jax.symmetry.groups import group_for
from qlhs_jax.symmetry.elements import float32_matmuls, sample


def prepare(model, variables: Mapping, dtype):
  """``(model, folded)`` computing in ``dtype``: the model's ``dtype`` and
  ``param_dtype`` are replaced (a check of a bfloat16 model would measure bfloat16
  rounding, not the symmetry) and its BatchNorms folded. Call it, and use the result,
  under ``jax.enable_x64(True)`` for float64."""
  m = model.clone(dtype=dtype, param_dtype=dtype)
  cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)
  return m, fold_batchnorm(m, cast(variables["params"]), cast(variables["batch_stats"]))


@float32_matmuls
def deviation(model, folded, elements, x) -> jax.Array:
  """Relative logit deviation ``max|f(g.theta, x) - f(theta, x)| / max|f(theta, x)|``
  of every element of ``elements`` (stacked along a leading axis), as a vector.

  ``act`` runs under ``jax.vmap`` over the elements; the forward passes then run one
  transformed tree after another (``lax.map``, each batched over ``x``): vmapping a
  forward pass over its *weights* turns MobileNetV3's depthwise convolutions into
  dense block-diagonal ones (a 5x5x7680x7680 kernel for 8 elements)."""
  ref = apply_folded(model, folded, x)
  scale = jnp.max(jnp.abs(ref))
  transformed = jax.vmap(act, in_axes=(0, None))(elements, folded)

  def one(params):
    return jnp.max(jnp.abs(apply_folded(model, params, x) - ref)) / scale
  return jax.lax.map(one, transformed)


def check(model, variables: Mapping, key, n: int = 16, *, x=None, image_size: int = 16,
          float64: bool = False, spread: float = 0.5, override=None,
          batch_size: int | None = None) -> float:
  """Largest relative logit deviation over ``n`` sampled group elements.

  Args:
    model: a zoo module (computed in float32, or float64).
    variables: ``{"params", "batch_stats"}`` of the model.
    key: JAX PRNG key (or int seed) for the elements and for the default ``x``.
    n: number of elements, applied (``act``) under ``jax.vmap``, ``batch_size`` at a
      time.
    x: input images (NHWC); default two standard-normal ``image_size`` images.
    float64: compute in float64 (under ``jax.enable_x64``). Expect ~1e-13 there and
      ~1e-6 in float32 for elements of the group.
    spread, override: passed to :func:`~qlhs_jax.symmetry.elements.sample`
      (``override`` samples elements outside the group: negative checks).
    batch_size: elements per vectorised batch (bounds the memory of the transformed
      trees); the batches run one after the other through one compiled function.
  """
  dtype = jnp.float64 if float64 else jnp.float32
  if not isinstance(key, jax.Array):
    key = jax.random.PRNGKey(int(key))
  kx, kg = jax.random.split(key)
  with jax.enable_x64(float64):
    m, folded = prepare(model, variables, dtype)
    if x is None:
      x = jax.random.normal(kx, (2, image_size, image_size, 3), dtype)
    gs = sample(group_for(m), kg, n, spread, override, dtype)
    run = jax.jit(lambda folded, gs, x: deviation(m, folded, gs, x))
    x = jnp.asarray(x, dtype)
    b = batch_size or n
    # Equal-sized batches (the last one padded with repeats): one compilation. Sliced
    # in NumPy: eager JAX indexing compiles one gather per leaf and shape.
    idx = np.arange(-(-n // b) * b) % n
    gs = jax.tree.map(np.asarray, gs)
    devs = [run(folded, jax.tree.map(lambda a: a[idx[i:i + b]], gs), x)
            for i in range(0, len(idx), b)]
    return float(jnp.max(jnp.concatenate(devs)))
