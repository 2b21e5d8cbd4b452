"""Group elements: a pytree per element, sampling, identity, composition, inverse.

An :class:`Element` holds one ``(n, n)`` matrix per stream slot (column convention,
``u -> T u``; permutations are permutation *matrices*, so composing is a matrix product
and monomial parts are read back with ``argmax``), and per block a dict of hidden
entries: a vector for a TORUS slot, a matrix for a matrix slot. The :class:`Group` rides
along as static data, so ``jax.jit`` and ``jax.vmap`` see only the arrays.

Every matrix travels with its inverse (``stream_inv``, ``hidden_inv``), computed where
it is exact or cheap: on the host when sampling, ``expm(-X)`` for ``expm(X)``, products
in reverse order when composing. ``act`` then never inverts. (It used to call
``jnp.linalg.inv``; batched under ``vmap`` on the 2-core CPU, jaxlib's LU kernel
deadlocked now and then: two LU thunks waiting on one exhausted thread pool.)
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import struct

from qlhs_jax.symmetry import groups as G


def float32_matmuls(fn):
  """``fn`` with its matmuls and convolutions at the precision of their operands'
  dtype (``jax.default_matmul_precision("highest")`` while it is traced). At DEFAULT
  precision XLA computes float32 dots and convolutions with TF32 inputs on NVIDIA GPUs
  since Ampere (10-bit mantissas) and with bfloat16 passes on TPUs: an action, a
  composition or a check would then carry ~1e-3 relative errors on those devices and
  float32's ~1e-7 on a CPU. The symmetry tools promise the latter everywhere."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)
  return wrapped


@struct.dataclass
class Element:
  """One group element: ``stream`` (tuple of matrices) and ``stream_inv`` (their
  inverses), ``hidden`` ({block: {slot: vector or matrix}}) and ``hidden_inv`` (the
  inverses of its matrices), and the static ``group``."""
  stream: tuple
  stream_inv: tuple
  hidden: dict
  hidden_inv: dict
  group: G.Group = struct.field(pytree_node=False)


def monomial_parts(t: jax.Array):
  """``(sigma, d)`` of a monomial matrix ``t`` (column convention): column ``j``'s entry
  sits in row ``sigma[j]`` and equals ``d[j]``, i.e. ``(t u)[sigma[j]] = d[j] u[j]``.
  For a non-monomial ``t`` this is the largest entry of each column (what ``act`` then
  uses, and why a non-monomial element breaks a literal form)."""
  sigma = jnp.argmax(jnp.abs(t), axis=0)
  return sigma, t[sigma, jnp.arange(t.shape[1])]


def inflate(sigma: jax.Array, m: int) -> jax.Array:
  """The permutation of ``n*m`` channels ``j*m + s`` that moves ``j`` by ``sigma``."""
  return (sigma[:, None] * m + jnp.arange(m)[None, :]).reshape(-1)


def gather_index(sigma: jax.Array) -> jax.Array:
  """``idx`` with ``new = old[idx]`` for the relabeling ``old[j] -> new[sigma[j]]``."""
  return jnp.argsort(sigma)


def induced_gather(g: Element, slot: G.Slot) -> jax.Array | None:
  """Gather index of the permutation the element's stream induces on a torus slot."""
  if slot.induced is None:
    return None
  stage, m = slot.induced
  sigma, _ = monomial_parts(g.stream[stage])
  return gather_index(inflate(sigma, m))


def _monomial_matrix(sigma, d):
  n = d.shape[0]
  return jnp.zeros((n, n), d.dtype).at[sigma, jnp.arange(n)].set(d)


def _np_monomial(sigma, d):
  t = np.zeros((len(d), len(d)))
  t[sigma, np.arange(len(d))] = d
  return t


def _np_scales(rng, n, which, spread):
  mag = np.exp(spread * rng.standard_normal(n))
  sign = rng.choice([-1.0, 1.0], n)
  return {"nonzero": sign * mag, "positive": mag, "sign": sign, "one": np.ones(n)}[which]


def _np_matrix(rng, kind, n, spread, sigma=None):
  """One matrix of ``kind`` (float64); ``sigma`` fixes a monomial kind's permutation."""
  if kind in (G.GL, G.O):
    x = spread * rng.standard_normal((n, n)) / np.sqrt(n)
    if kind == G.GL:
      return scipy.linalg.expm(x)
    # expm of a skew matrix is a rotation; a random signed permutation reaches both
    # components of O(n) and moves far from the identity.
    return scipy.linalg.expm(x - x.T) @ _np_matrix(rng, G.SIGNPERM, n, spread)
  if kind not in G._MONO_SCALES:
    raise ValueError(f"cannot sample a matrix of kind {kind!r}")
  if sigma is None:
    sigma = rng.permutation(n)
  return _np_monomial(sigma, _np_scales(rng, n, G._MONO_SCALES[kind], spread))


def _rng(key):
  if isinstance(key, (int, np.integer)):
    return np.random.default_rng(int(key))
  return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def sample(group: G.Group, key, n: int | None = None, spread: float = 0.5,
           override: str | Mapping[str, str] | None = None, dtype=None) -> Element:
  """Random, well-conditioned elements: ``expm`` of a Lie-algebra element of size
  ``spread`` (GL, O), random permutations and signs, ``exp(spread * N(0,1))`` scales.

  Sampling runs on the host (NumPy/SciPy, float64): it is cheap there, while a traced
  sampler would cost seconds of XLA compilation per model for nothing.

  Args:
    group: from :func:`~qlhs_jax.symmetry.groups.group_for`.
    key: a JAX PRNG key or an int seed.
    n: if given, ``n`` elements stacked along a leading axis (for ``jax.vmap``).
    spread: size of the continuous part.
    override: sample some matrix slots from another kind, e.g. ``"GL"`` (every matrix
      slot) or ``{"stage2": "GL", "stage1_block0/h1": "GL"}`` (by stream slot name, or
      ``block/slot``): elements *outside* the declared group, for negative checks.
    dtype: float dtype of the arrays (default: JAX's default float).
  """
  if n is not None:
    rng = _rng(key)
    seeds = rng.integers(0, 2**63 - 1, n)
    one = [sample(group, int(s), None, spread, override, dtype) for s in seeds]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *one)
  dtype = dtype or jnp.zeros(()).dtype
  rng = _rng(key)
  if isinstance(override, str):
    override = {"*": override}
  override = dict(override or {})

  def kind_of(slot, path):
    return override.get(path, override.get("*", slot.kind))

  stream, sigmas = [], []
  for slot in group.stages:
    kind = kind_of(slot, slot.name)
    sigma = None
    if slot.tied is not None and kind in G._MONO_SCALES:
      src, ratio = slot.tied
      sigma = (sigmas[src][:, None] * ratio + np.arange(ratio)).reshape(-1)
    t = _np_matrix(rng, kind, slot.size, spread, sigma)
    stream.append(t)
    sigmas.append(np.argmax(np.abs(t), axis=0))
  hidden, hidden_inv = {}, {}
  for spec in group.blocks:
    entries, inverses = {}, {}
    for slot in spec.hidden:
      if slot.kind == G.TORUS:
        entries[slot.name] = _np_scales(rng, slot.size, "nonzero", spread)
      else:
        kind = kind_of(slot, f"{spec.name}/{slot.name}")
        entries[slot.name] = _np_matrix(rng, kind, slot.size, spread)
        inverses[slot.name] = np.linalg.inv(entries[slot.name])
    hidden[spec.name], hidden_inv[spec.name] = entries, inverses
  cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)
  # Host float64 inverses (NumPy's LAPACK): exact for monomials, ~1e-16 otherwise.
  return Element(cast(tuple(stream)), cast(tuple(np.linalg.inv(t) for t in stream)),
                 cast(hidden), cast(hidden_inv), group)


def identity(group: G.Group, dtype=None) -> Element:
  dtype = dtype or jnp.zeros(()).dtype
  stream = tuple(jnp.eye(s.size, dtype=dtype) for s in group.stages)
  hidden = {b.name: {s.name: (jnp.ones((s.size,), dtype) if s.kind == G.TORUS
                              else jnp.eye(s.size, dtype=dtype)) for s in b.hidden}
            for b in group.blocks}
  hidden_inv = {b.name: {s.name: jnp.eye(s.size, dtype=dtype) for s in b.hidden
                         if s.kind != G.TORUS} for b in group.blocks}
  return Element(stream, stream, hidden, hidden_inv, group)


@float32_matmuls
def compose(g2: Element, g1: Element) -> Element:
  """The product ``g2 g1`` (first ``g1``, then ``g2``): ``act(g2, act(g1, p)) ==
  act(compose(g2, g1), p)``.

  Streams and hidden matrices multiply (inverses in reverse order). A torus ``l`` is
  read in the frame after its stream's permutation, so ``g2``'s permutation first moves
  ``g1``'s torus along."""
  if g1.group != g2.group:
    raise ValueError("compose: elements of different groups")
  stream = tuple(t2 @ t1 for t2, t1 in zip(g2.stream, g1.stream))
  stream_inv = tuple(i1 @ i2 for i2, i1 in zip(g2.stream_inv, g1.stream_inv))
  hidden, hidden_inv = {}, {}
  for spec in g1.group.blocks:
    entries, inverses = {}, {}
    for slot in spec.hidden:
      a2, a1 = g2.hidden[spec.name][slot.name], g1.hidden[spec.name][slot.name]
      if slot.kind == G.TORUS:
        idx = induced_gather(g2, slot)
        entries[slot.name] = (a1 if idx is None else a1[idx]) * a2
      else:
        entries[slot.name] = a2 @ a1
        inverses[slot.name] = (g1.hidden_inv[spec.name][slot.name] @
                               g2.hidden_inv[spec.name][slot.name])
    hidden[spec.name], hidden_inv[spec.name] = entries, inverses
  return Element(stream, stream_inv, hidden, hidden_inv, g1.group)


def inverse(g: Element) -> Element:
  """``g^-1``: ``compose(inverse(g), g)`` is the identity."""
  # With the matrices swapped, the stream induces the inverse relabeling.
  swapped = Element(g.stream_inv, g.stream, g.hidden, g.hidden_inv, g.group)
  hidden, hidden_inv = {}, {}
  for spec in g.group.blocks:
    entries, inverses = {}, {}
    for slot in spec.hidden:
      a = g.hidden[spec.name][slot.name]
      if slot.kind == G.TORUS:
        # compose(g^-1, g) has torus a[idx_inv] * l' = 1.
        idx = induced_gather(swapped, slot)
        entries[slot.name] = 1.0 / (a if idx is None else a[idx])
      else:
        entries[slot.name] = g.hidden_inv[spec.name][slot.name]
        inverses[slot.name] = a
    hidden[spec.name], hidden_inv[spec.name] = entries, inverses
  return Element(g.stream_inv, g.stream, hidden, hidden_inv, g.group)
