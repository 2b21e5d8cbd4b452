"""Lossless sparsification (the paper's proposal, symmetry.md 5).

Gradient descent over the *continuous* part of the group, parametrised by its Lie
algebra (``expm`` for GL and O, ``exp`` of log-scales for the diagonal parts and the
hidden tori), minimises an L1 measure of the transformed weights. The transformed
model computes the same function, so magnitude pruning of its 1x1 weights can start
from a basis in which they are sparser. Permutations and signs are discrete and do not
change magnitudes, so they stay at the identity.

The measure covers every weight the group moves (the 1x1 maps and also D's kernels, the
stem and the head), not the 1x1 maps alone: a hidden torus trades a 1x1 map's column
against D's kernel, and a stream scaling trades the last 1x1 writes against the head,
so on the 1x1 maps alone the infimum is 0, reached by pushing all weight into the maps
that are not measured. With every moved weight counted, each such trade is balanced
(``l|x| + |y|/l`` has a minimum) and the optimum is a genuine change of basis.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.scipy.linalg import expm

from qlhs_jax.symmetry import groups as G
from qlhs_jax.symmetry.action import act
from qlhs_jax.symmetry.elements import Element

# QLHS 1x1 maps; other families' 1x1 convolutions are found by shape.
_QLHS_1X1 = ("c", "a", "w")


def is_1x1(path, leaf) -> bool:
  """Whether a folded leaf is a 1x1 weight matrix (pruned and measured)."""
  name = getattr(path[-1], "key", None)
  if name in _QLHS_1X1:
    return True
  return name == "kernel" and leaf.ndim == 4 and leaf.shape[:2] == (1, 1)


def one_by_one(folded) -> dict[str, jax.Array]:
  """``{path: weight}`` of every 1x1 weight of a folded tree."""
  return {jax.tree_util.keystr(p): leaf
          for p, leaf in jax.tree_util.tree_flatten_with_path(folded)[0] if is_1x1(p, leaf)}


def count_1x1(folded) -> int:
  return sum(int(w.size) for w in one_by_one(folded).values())


def _continuous(kind: str, n: int):
  """Shape of a slot's Lie-algebra coordinates (None: no continuous part)."""
  if kind in (G.GL, G.O):
    return (n, n)
  if kind in (G.MONO, G.POSMONO, G.TORUS):
    return (n,)
  return None


def algebra_zeros(group: G.Group, dtype=jnp.float32, mixing: bool = True):
  """Lie-algebra coordinates of the identity: ``{"stream": {slot: X}, "hidden":
  {block: {slot: x}}}`` for the slots with a continuous part (without the GL and O
  slots when ``mixing`` is False: the diagonal subgroup, for ablations)."""
  def shape(s):
    if not mixing and s.kind in (G.GL, G.O):
      return None
    return _continuous(s.kind, s.size)
  stream = {s.name: jnp.zeros(shape(s), dtype) for s in group.stages if shape(s)}
  hidden = {b.name: {s.name: jnp.zeros(shape(s), dtype) for s in b.hidden if shape(s)}
            for b in group.blocks}
  return {"stream": stream, "hidden": hidden}


def _exp(kind, x, n, dtype):
  """``(exp(x), exp(-x))`` of a slot: matrices, or vectors for a torus."""
  if x is None:
    one = jnp.eye(n, dtype=dtype) if kind != G.TORUS else jnp.ones((n,), dtype)
    return one, one
  if kind == G.GL:
    return expm(x), expm(-x)
  if kind == G.O:
    return expm(x - x.T), expm(x.T - x)
  if kind == G.TORUS:
    return jnp.exp(x), jnp.exp(-x)
  return jnp.diag(jnp.exp(x)), jnp.diag(jnp.exp(-x))  # a monomial kind's diagonal


def exp_element(group: G.Group, theta, dtype=jnp.float32) -> Element:
  """The group element ``exp(theta)`` (identity component, no permutations)."""
  stream = [_exp(s.kind, theta["stream"].get(s.name), s.size, dtype) for s in group.stages]
  hidden, hidden_inv = {}, {}
  for b in group.blocks:
    pairs = {s.name: _exp(s.kind, theta["hidden"][b.name].get(s.name), s.size, dtype)
             for s in b.hidden}
    hidden[b.name] = {k: v[0] for k, v in pairs.items()}
    hidden_inv[b.name] = {s.name: pairs[s.name][1] for s in b.hidden
                          if s.kind != G.TORUS}
  return Element(tuple(t for t, _ in stream), tuple(i for _, i in stream), hidden,
                 hidden_inv, group)


def weights(folded) -> dict[str, jax.Array]:
  """``{path: leaf}`` of every weight (every leaf but the biases) of a folded tree."""
  return {jax.tree_util.keystr(p): leaf
          for p, leaf in jax.tree_util.tree_flatten_with_path(folded)[0]
          if not str(getattr(p[-1], "key", "")).endswith("bias")}


def l1_measure(folded, reference) -> jax.Array:
  """Mean over weight tensors of ``|W|_1 / |W_reference|_1`` (1 at the identity).

  Not scale-invariant on purpose: a scaling ``l`` of a column and ``1/l`` of the
  matching row is then balanced instead of driven to infinity, which would make one
  tensor look sparse by making its partner dense."""
  new, ref = weights(folded), weights(reference)
  return sum(jnp.sum(jnp.abs(new[k])) / jnp.sum(jnp.abs(ref[k])) for k in ref) / len(ref)


def l1_1x1(folded, reference) -> jax.Array:
  """``|W|_1 / |W_reference|_1`` over all 1x1 weights together (for reports)."""
  new, ref = one_by_one(folded), one_by_one(reference)
  return (sum(jnp.sum(jnp.abs(w)) for w in new.values()) /
          sum(jnp.sum(jnp.abs(w)) for w in ref.values()))


def optimize(group: G.Group, folded, steps: int = 500, learning_rate: float = 0.02,
             log: Callable[[int, float], None] | None = None, mixing: bool = True):
  """Minimises :func:`l1_measure` of ``act(exp(theta), folded)`` over ``theta`` (Adam;
  ``mixing=False``: over the diagonal part only, no GL or O).

  Returns ``(theta, history)``: the Lie-algebra coordinates of the best element found
  (``exp_element(group, theta)``; in float64 too, for an exact verification) and the
  measure at every step.
  """
  dtype = jax.tree.leaves(folded)[0].dtype
  theta = algebra_zeros(group, dtype, mixing)
  opt = optax.adam(learning_rate)
  state = opt.init(theta)

  def loss_fn(theta):
    return l1_measure(act(exp_element(group, theta, dtype), folded), folded)

  @jax.jit
  def step(theta, state):
    loss, grad = jax.value_and_grad(loss_fn)(theta)
    updates, state = opt.update(grad, state, theta)
    return optax.apply_updates(theta, updates), state, loss

  history, best, best_theta = [], math.inf, theta
  for i in range(steps):
    new_theta, state, loss = step(theta, state)
    loss = float(loss)
    history.append(loss)
    if loss < best:  # the loss belongs to theta, before the update
      best, best_theta = loss, theta
    theta = new_theta
    if log is not None and (i % 100 == 0 or i == steps - 1):
      log(i, loss)
  final = float(jax.jit(loss_fn)(theta))
  if final < best:
    best_theta = theta
  return best_theta, history


def prune(folded, fraction: float):
  """Magnitude pruning of every 1x1 weight matrix, layer by layer: keeps the
  ``ceil(fraction * size)`` entries of largest absolute value, zeroes the rest."""
  def one(path, leaf):
    if not is_1x1(path, leaf) or fraction >= 1:
      return leaf
    keep = max(int(math.ceil(fraction * leaf.size)), 0)
    if keep == 0:
      return jnp.zeros_like(leaf)
    threshold = jnp.sort(jnp.abs(leaf).ravel())[leaf.size - keep]
    return jnp.where(jnp.abs(leaf) >= threshold, leaf, 0)
  return jax.tree_util.tree_map_with_path(one, folded)


def kept_fraction(folded) -> float:
  """Fraction of non-zero 1x1 weights."""
  ws = one_by_one(folded).values()
  return sum(int(jnp.count_nonzero(w)) for w in ws) / sum(int(w.size) for w in ws)
