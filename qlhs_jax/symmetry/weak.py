"""Weak (data) symmetry of the literal forms (symmetry.md 3).

Where the block form shrinks a stream's group below what its activations allow (the
literal Eq.(3) under softball: O(n) -> signed permutations), search, by gradient descent
on the Lie algebra, for a transformation that moves a fixed distance *off* the exact
group yet keeps the logits on data: ``T = expm(r * Y / |Y|)`` with ``Y`` in the algebra
of what the activations allow (off-diagonal part only), times the exact group's
continuous part (diagonal scales, hidden tori), which is optimised freely. The same
``act`` is used: for a non-monomial ``T`` it reads D's scale from ``T``'s diagonal, the
natural extension of the exact action.

Reported per radius ``r``: the distance of ``T`` from the monomial matrices (relative
Frobenius norm of what lies off each column's largest entry), the relative logit error
on the batch used for the search and on held-out data, and the same error for a random
direction of the same radius.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.linalg import expm

from qlhs_jax.models.fold import apply_folded
from qlhs_jax.symmetry import groups as G
from qlhs_jax.symmetry.action import act
from qlhs_jax.symmetry.elements import Element, float32_matmuls
from qlhs_jax.symmetry.sparsify import algebra_zeros, exp_element


def gap_stages(group: G.Group) -> list[int]:
  """Stages whose activations allow mixing (GL or O) that the block form forbids."""
  return [k for k, s in enumerate(group.stages)
          if s.allows in (G.GL, G.O) and s.kind not in (G.GL, G.O)]


def off_monomial(t: jax.Array) -> jax.Array:
  """``|t - m(t)|_F / |t|_F``, ``m(t)`` keeping each column's largest entry."""
  mask = jax.nn.one_hot(jnp.argmax(jnp.abs(t), axis=0), t.shape[0], axis=0)
  return jnp.linalg.norm(t * (1 - mask)) / jnp.linalg.norm(t)


def _generators(group, stages, direction, radius):
  """Off-diagonal generators of total Frobenius norm ``radius`` (skew for O)."""
  gens = {}
  for k in stages:
    y = direction[k] * (1 - jnp.eye(direction[k].shape[0], dtype=direction[k].dtype))
    gens[k] = y - y.T if group.stages[k].allows == G.O else y
  norm = jnp.sqrt(sum(jnp.sum(g * g) for g in gens.values()))
  return {k: radius * g / norm for k, g in gens.items()}


@float32_matmuls
def _element(group, stages, direction, free, radius, dtype):
  base = exp_element(group, free, dtype)
  gens = _generators(group, stages, direction, radius)
  stream = tuple(expm(gens[k]) @ t if k in gens else t for k, t in enumerate(base.stream))
  stream_inv = tuple(t @ expm(-gens[k]) if k in gens else t
                     for k, t in enumerate(base.stream_inv))
  return Element(stream, stream_inv, base.hidden, base.hidden_inv, group)


@float32_matmuls
def rel_error(model, folded, new, x):
  """``max|f_new - f| / max|f|`` on ``x`` and the fraction of equal top-1 predictions."""
  ref, out = apply_folded(model, folded, x), apply_folded(model, new, x)
  err = jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref))
  agree = jnp.mean(jnp.argmax(out, -1) == jnp.argmax(ref, -1))
  return err, agree


def search(model, folded, x_fit, x_eval, radii=(0.01, 0.03, 0.1, 0.3, 1.0),
           steps: int = 300, learning_rate: float = 0.02, seed: int = 0) -> list[dict]:
  """Weak-symmetry curve of a folded model (computing in ``folded``'s dtype).

  Returns one dict per radius: ``radius``, ``off_monomial`` (largest over stages),
  ``error_fit``, ``error_eval``, ``top1_agree_eval`` and the ``random_*`` baselines.
  """
  from qlhs_jax.symmetry.groups import group_for
  group = group_for(model)
  stages = gap_stages(group)
  if not stages:
    raise ValueError("no stream of this model has a gap between the exact group and "
                     "what its activations allow: no weak symmetry to search for")
  dtype = jax.tree.leaves(folded)[0].dtype
  rng = np.random.default_rng(seed)
  random_dir = {k: jnp.asarray(rng.standard_normal((group.stages[k].size,) * 2), dtype)
                for k in stages}
  ref_fit = apply_folded(model, folded, x_fit)

  def loss_fn(params, radius):
    g = _element(group, stages, params["dir"], params["free"], radius, dtype)
    out = apply_folded(model, act(g, folded), x_fit)
    return jnp.mean((out - ref_fit) ** 2) / jnp.mean(ref_fit ** 2)

  opt = optax.adam(learning_rate)

  @jax.jit
  def step(params, state, radius):
    loss, grad = jax.value_and_grad(loss_fn)(params, radius)
    updates, state = opt.update(grad, state, params)
    return optax.apply_updates(params, updates), state, loss

  @jax.jit
  def report(params, radius):
    g = _element(group, stages, params["dir"], params["free"], radius, dtype)
    new = act(g, folded)
    dist = jnp.max(jnp.stack([off_monomial(g.stream[k]) for k in stages]))
    return (dist,) + rel_error(model, folded, new, x_fit) + rel_error(model, folded, new,
                                                                       x_eval)

  rows = []
  for radius in radii:
    r = jnp.asarray(radius, dtype)
    params = {"dir": random_dir, "free": algebra_zeros(group, dtype)}
    d0, ef0, _, ee0, ag0 = report(params, r)
    state = opt.init(params)
    for _ in range(steps):
      params, state, _ = step(params, state, r)
    d, ef, _, ee, ag = report(params, r)
    rows.append({"radius": float(radius), "off_monomial": float(d),
                 "error_fit": float(ef), "error_eval": float(ee),
                 "top1_agree_eval": float(ag), "random_off_monomial": float(d0),
                 "random_error_fit": float(ef0), "random_error_eval": float(ee0),
                 "random_top1_agree_eval": float(ag0)})
  return rows
