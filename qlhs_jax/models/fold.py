"""BatchNorm folding: the inference form of a trained model.

``fold_batchnorm(model, params, batch_stats)`` is a pure function returning a plain
pytree of arrays in which every BatchNorm has been folded into the neighbouring affine
map (eval mode: ``BN(z) = a * z + b`` with ``a, b`` from the running statistics).
``apply_folded(model, folded, x)`` runs that form; it equals ``model.apply(...,
train=False)``. The symmetry tools act on this form.

Names in the folded tree (per block ``stageK_blockI``; shapes with ``J = n_in``):

* ``c``, ``a``, ``w``: the 1x1 maps, (in, out), with the output BN's scale folded into
  ``a`` (eq3, eq3w, eq6, eq7) or into ``c`` (eq4, eq5: the product is bilinear).
* ``c_bias``: the folded BN after ``C`` (eq6 with ``eq6_c_norm``, eq7).
* ``d_kernel`` (3, 3, J, e), ``d_bias`` (J*e,): D with its BN folded in; the shared
  kernels become per-channel (each hidden channel has its own BN scale). The kernel is
  indexed by (j, s) in both hidden layouts; ``d_bias``, ``c`` and ``a`` follow the
  model's ``hidden_layout`` (channel ``s*J + j`` for ``"s_major"``).
* ``out_bias`` (n_out,): the output BN's offset.
* ``shortcut``: ``{"kernel" (1, 1, n_in, n_out), "bias"}``; ``stem``: likewise (7x7 or 3x3).
* ``head``: ``{"kernel", "bias"}`` unchanged.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from qlhs_jax.models.common import batchnorm_affine
from qlhs_jax.models.layout import permutation


def _fold_conv_norm(p, st):
  a, b = batchnorm_affine(p["bn"], st["bn"])
  return {"kernel": p["kernel"] * a, "bias": b}


def _fold_qlhs_block(p, st, form, layout):
  out = {}
  a_d, b_d = batchnorm_affine(p["bn_d"], st["bn_d"])
  k = p["d_kernel"]
  e = k.shape[-1]
  j = a_d.shape[0] // e
  smaj = layout == "s_major"
  # The folded kernel is (3, 3, J, e) in both layouts: the scale of hidden channel
  # (j, s) sits at j*e + s (j-major) or s*J + j (s-major).
  scale = a_d.reshape(e, j).T if smaj else a_d.reshape(j, e)
  out["d_kernel"] = jnp.broadcast_to(k, (3, 3, j, e)) * scale
  out["d_bias"] = b_d
  a_o, b_o = batchnorm_affine(p["bn_out"], st["bn_out"])
  out["out_bias"] = b_o
  c = p["c"]
  if form in ("eq3", "eq3w", "eq6", "eq7"):
    out["a"] = p["a"] * a_o
  elif form == "eq4":
    out["a"] = p["a"]
    c = c * a_o
  elif form == "eq5":
    a_h = jnp.repeat(a_o, c.shape[1] // a_o.shape[0])  # hidden j*e + s -> its output
    c = c * (a_h[permutation(j, e, "s_major")] if smaj else a_h)
  else:
    raise ValueError(f"unknown block form {form!r}")
  if "bn_c" in p:
    a_c, b_c = batchnorm_affine(p["bn_c"], st["bn_c"])
    c, out["c_bias"] = c * a_c, b_c
  out["c"] = c
  if "w" in p:
    out["w"] = p["w"]
  if "shortcut" in p:
    out["shortcut"] = _fold_conv_norm(p["shortcut"], st["shortcut"])
  return out


def fold_batchnorm(model: Any, params, batch_stats):
  """Folds every BatchNorm of ``model`` (a zoo module) into its neighbouring map."""
  form = getattr(model, "form", None)
  layout = getattr(model, "hidden_layout", "j_major")

  def walk(p, st):
    if "bn_d" in p:  # a QLHS block
      return _fold_qlhs_block(p, st, form, layout)
    if "bn" in p and "kernel" in p:
      return _fold_conv_norm(p, st)
    return {key: (walk(v, st.get(key, {})) if isinstance(v, dict) else v)
            for key, v in p.items()}
  return walk(dict(params), dict(batch_stats))


def apply_folded(model: Any, folded, x):
  """The inference forward pass on the folded form (equals eval mode)."""
  return model.clone(folded=True).apply({"params": folded}, x, train=False)
