"""The group action on BN-folded parameters: ``act(g, folded) -> folded``.

Pure, ``jax.jit``- and ``jax.vmap``-able (over ``g``, over ``folded``, or both). The
folded tree is the one of :func:`qlhs_jax.models.fold.fold_batchnorm`; channel vectors are
rows there, so a stream ``u -> T u`` turns a map that *writes* the stream, ``x @ W``,
into ``x @ W @ T.T`` and a map that *reads* it into ``T^-T @ W`` (symmetry.md 2).

For the literal forms (Eq.(3)-(7)), D reads stream channels one by one: the permutation
``sigma`` and the scales ``d`` of a monomial ``T`` (read back with ``argmax``) relabel
the hidden channels ``(j, s) -> (sigma(j), s)`` and divide D's kernel by ``d_j``. With a
non-monomial ``T`` the same formulas no longer give the same function, which is exactly
the negative check of the tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qlhs_jax.symmetry import groups as G
from qlhs_jax.symmetry.elements import (Element, float32_matmuls, gather_index, inflate,
                                      monomial_parts, _monomial_matrix)


@float32_matmuls
def act(g: Element, folded):
  """Applies ``g`` to a folded parameter tree; returns a tree of the same structure
  and dtypes, computing the same function when ``g`` lies in ``g.group``."""
  family = g.group.family
  fn = {"qlhs": _act_qlhs, "resnet": _act_resnet, "mobilenetv3": _act_mobilenet}[family]
  dtype = jax.tree.leaves(folded)[0].dtype
  g = jax.tree.map(lambda a: a.astype(jnp.promote_types(a.dtype, dtype)), g)
  out = fn(g, folded)
  return jax.tree.map(lambda new, old: new.astype(old.dtype), out, folded)


def _frames(g):
  """Per stream slot: (read matrix T^-T, write matrix T^T)."""
  return [t.T for t in g.stream_inv], [t.T for t in g.stream]


def _conv(p, read=None, write=None):
  """A conv (or dense) ``{"kernel" (..., in, out), "bias" (out,)}`` whose input is
  read in a new frame and whose output is written in one."""
  k, b = p["kernel"], p["bias"]
  if read is not None:
    k = read @ k
  if write is not None:
    k, b = k @ write, b @ write
  return {"kernel": k, "bias": b}


def _act_qlhs(g, p):
  reads, writes = _frames(g)
  out = dict(p)
  out["stem"] = _conv(p["stem"], write=writes[0])
  for spec in g.group.blocks:
    out[spec.name] = _act_qlhs_block(g, spec, p[spec.name], reads, writes)
  out["head"] = _conv(p["head"], read=reads[-1])
  return out


def _act_qlhs_block(g, spec, p, reads, writes):
  form, e, n_out = spec.get("form"), spec.get("expansion"), spec.get("n_out")
  tor = g.hidden[spec.name]
  rin, wout = reads[spec.stage_in], writes[spec.stage_out]
  kernel = p["d_kernel"]                     # (3, 3, J, e), hidden channel j*e + s
  j = kernel.shape[2]
  h = j * e
  k = kernel.reshape(3, 3, h)
  if form in G.LITERAL_FORMS:
    sigma, d = monomial_parts(g.stream[spec.stage_in])
    gj, gi = gather_index(sigma), gather_index(inflate(sigma, e))
    k = k / jnp.repeat(d, e)                 # u_j = u~_sigma(j) / d_j feeds D
  else:
    gj, gi = jnp.arange(j), jnp.arange(h)
  ones = jnp.ones((h,), k.dtype)
  l = tor.get("dout", ones)                  # D's output (kernel and bias) times l
  k = k[..., gi] * l
  q = {"d_bias": p["d_bias"][gi] * l, "out_bias": p["out_bias"] @ wout}
  c = rin @ p["c"]
  if form in ("eq3", "eq3w"):
    m = tor["prod"]                          # C's column times m / l, A's row / m
    q["c"] = c[:, gi] * (m / l)
    q["a"] = (p["a"][gi] / m[:, None]) @ wout
    if form == "eq3w":
      lam = tor["din"]                       # W's column times lam, D's kernel / lam
      q["w"] = (rin @ p["w"]) * lam
      k = k / jnp.repeat(lam, e)
  elif form == "eq4":
    # The product is in the output's basis: its permutation moves C's and A's columns,
    # its scale goes to C; the torus m trades C's column against A's.
    m = tor["prod"]
    so, do = monomial_parts(g.stream[spec.stage_out])
    go = gather_index(so)
    q["c"] = (c * do)[:, go] * m
    q["a"] = (p["a"][gi] / l[:, None])[:, go] / m
  elif form == "eq5":
    # Output o sums hidden channels o*g .. o*g+g-1; its scale goes to their C columns.
    so, do = monomial_parts(g.stream[spec.stage_out])
    q["c"] = (c * jnp.repeat(do, h // n_out))[:, gi] / l
  elif form in ("eq6", "eq7"):
    # D reads u * (C u + c_bias): C's output is indexed by stream channels (eq6) or by
    # hidden channels (eq7); lam trades it against D's kernel.
    lam = tor["din"]
    idx = gj if form == "eq6" else gi
    q["c"] = c[:, idx] * lam
    if "c_bias" in p:
      q["c_bias"] = p["c_bias"][idx] * lam
    k = k / (jnp.repeat(lam, e) if form == "eq6" else lam)
    q["a"] = (p["a"][gi] / l[:, None]) @ wout
  else:
    raise ValueError(f"unknown block form {form!r}")
  q["d_kernel"] = k.reshape(kernel.shape)
  if "shortcut" in p:
    q["shortcut"] = _conv(p["shortcut"], read=rin, write=wout)
  return q


def _act_resnet(g, p):
  reads, writes = _frames(g)
  out = dict(p)
  out["stem"] = _conv(p["stem"], write=writes[0])
  for spec in g.group.blocks:
    b = p[spec.name]
    m1, m2 = g.hidden[spec.name]["h1"], g.hidden[spec.name]["h2"]
    i1, i2 = g.hidden_inv[spec.name]["h1"], g.hidden_inv[spec.name]["h2"]
    q = {"conv1": _conv(b["conv1"], read=reads[spec.stage_in], write=m1.T),
         "conv2": _conv(b["conv2"], read=i1.T, write=m2.T),
         "conv3": _conv(b["conv3"], read=i2.T, write=writes[spec.stage_out])}
    if "shortcut" in b:
      q["shortcut"] = _conv(b["shortcut"], read=reads[spec.stage_in],
                            write=writes[spec.stage_out])
    out[spec.name] = q
  out["head"] = _conv(p["head"], read=reads[-1])
  return out


def _act_mobilenet(g, p):
  reads, writes = _frames(g)
  out = dict(p)
  out["stem"] = _conv(p["stem"], write=writes[0])
  for spec in g.group.blocks:
    b = p[spec.name]
    # Block 0 has no expansion: its depthwise conv runs in segment 0's frame.
    if "mid" in g.hidden[spec.name]:
      mid, mid_inv = g.hidden[spec.name]["mid"], g.hidden_inv[spec.name]["mid"]
    else:
      mid, mid_inv = g.stream[spec.stage_in], g.stream_inv[spec.stage_in]
    mid_read, mid_write = mid_inv.T, mid.T
    sigma, _ = monomial_parts(mid)
    q = {}
    if "expand" in b:
      q["expand"] = _conv(b["expand"], read=reads[spec.stage_in], write=mid_write)
    # Depthwise: a channel keeps its kernel; its input and output scale alike.
    dw = b["depthwise"]
    q["depthwise"] = {"kernel": dw["kernel"][..., gather_index(sigma)],
                      "bias": dw["bias"] @ mid_write}
    if "se" in b:
      s = g.hidden[spec.name]["se"]
      # The gate multiplies y channel by channel: it is permuted, never scaled.
      perm = _monomial_matrix(sigma, jnp.ones(sigma.shape, mid.dtype))
      s_inv = g.hidden_inv[spec.name]["se"]
      q["se"] = {"reduce": _conv(b["se"]["reduce"], read=mid_read, write=s.T),
                 "expand": _conv(b["se"]["expand"], read=s_inv.T, write=perm.T)}
    q["project"] = _conv(b["project"], read=mid_read, write=writes[spec.stage_out])
    out[spec.name] = q
  out["final_conv"] = _conv(p["final_conv"], read=reads[-1])
  return out
