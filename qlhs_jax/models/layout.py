"""Moving a QLHS model's variables between the hidden-channel layouts.

A block's ``h = e * n_in`` hidden channels ``(j, s)`` are ordered ``j*e + s``
(``hidden_layout="j_major"``, the default) or ``s*n_in + j`` (``"s_major"``, a speed
variant). The two models compute the same function when every array indexed by hidden
channels is permuted: C's output columns (eq3, eq3w, eq5, eq7), A's input rows (eq3,
eq3w, eq4, eq6, eq7), BN_d (and eq7's BN_c) parameters and running statistics; in a
folded tree (:mod:`qlhs_jax.models.fold`) ``d_bias``, eq7's ``c_bias`` and the same
maps. D's kernel (3, 3, 1 or n_in, e) is indexed by ``(j, s)`` apart, so it is unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qlhs_jax.models.layers import HIDDEN_LAYOUTS

# Forms whose C writes, or whose A reads, hidden channels.
_C_HIDDEN = ("eq3", "eq3w", "eq5", "eq7")
_A_HIDDEN = ("eq3", "eq3w", "eq4", "eq6", "eq7")


def permutation(n: int, e: int, to: str) -> np.ndarray:
  """Index array ``perm`` with ``x_to = x_from[..., perm]`` for hidden vectors of
  ``n`` input channels times ``e`` kernels."""
  if to not in HIDDEN_LAYOUTS:
    raise ValueError(f"unknown hidden layout {to!r}; choose one of {HIDDEN_LAYOUTS}")
  idx = np.arange(n * e)
  if to == "s_major":  # position s*n + j holds j-major channel j*e + s
    return idx.reshape(n, e).T.reshape(-1)
  return idx.reshape(e, n).T.reshape(-1)  # position j*e + s holds s*n + j


def _form_and_e(model) -> tuple[str, int]:
  if isinstance(model, str):
    from qlhs_jax.models import registry
    model = registry.create(model)
  if getattr(model, "form", None) is None:
    raise ValueError(f"{type(model).__name__} has no QLHS blocks (no 'form' field)")
  return model.form, model.expansion


def _take(w, perm, axis):
  """``w`` permuted along ``axis``: a gather under tracing, else in NumPy (a checkpoint
  converts without compiling one gather per shape)."""
  if isinstance(w, jax.core.Tracer):
    return jnp.take(w, perm, axis=axis)
  return jnp.asarray(np.take(np.asarray(w), perm, axis=axis))


def _block(tree: Mapping, form: str, e: int, h: int, to: str) -> dict:
  """Permutes the hidden-indexed leaves of one block's collection (params, batch_stats
  or a folded tree)."""
  perm = permutation(h // e, e, to)
  cols = lambda w: _take(w, perm, -1)
  out = dict(tree)
  for name in ("bn_d", "d_bias") + (("bn_c", "c_bias") if form == "eq7" else ()):
    if name in out:
      out[name] = (cols(out[name]) if not isinstance(out[name], Mapping)
                   else {k: cols(v) for k, v in out[name].items()})
  if "c" in out and form in _C_HIDDEN:
    out["c"] = cols(out["c"])
  if "a" in out and form in _A_HIDDEN:
    out["a"] = _take(out["a"], perm, 0)
  return out


def convert_hidden_layout(model: Any, variables: Mapping, to: str) -> dict:
  """The variables of the ``to``-layout model that computes what the other layout's
  ``variables`` compute (pure; arrays not indexed by hidden channels are passed through).

  Args:
    model: a QLHSNet or QLHSBlock (either layout) or a registered model name; only
      its ``form`` and ``expansion`` are read.
    variables: ``{"params": ..., "batch_stats": ...}`` of the other layout (any subset
      of collections; ``{"params": grads}`` converts gradients, ``{"params": folded}``
      a BatchNorm-folded tree).
    to: ``"s_major"`` (from j-major variables) or ``"j_major"`` (from s-major ones).
      Nothing in the arrays says which layout they are in: converting twice in the same
      direction scrambles them.
  """
  if to not in HIDDEN_LAYOUTS:
    raise ValueError(f"unknown hidden layout {to!r}; choose one of {HIDDEN_LAYOUTS}")
  form, e = _form_and_e(model)

  def walk(tree):
    if "bn_d" in tree or "d_bias" in tree:  # a QLHS block (params, stats or folded)
      hid = tree.get("bn_d", tree.get("d_bias"))
      h = (next(iter(hid.values())) if isinstance(hid, Mapping) else hid).shape[-1]
      if "d_kernel" in tree and tree["d_kernel"].shape[-1] != e:
        raise ValueError(f"d_kernel {tree['d_kernel'].shape} does not have the "
                         f"model's expansion {e}")
      return _block(tree, form, e, h, to)
    return {k: (walk(v) if isinstance(v, Mapping) else v) for k, v in tree.items()}

  return {col: walk(tree) for col, tree in variables.items()}
