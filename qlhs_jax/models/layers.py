"""Building blocks shared by the QLHS models: the 3x3 operator D and the activations.

D is the paper's trainable "derivative": a depthwise 3x3 convolution in which every
input channel j yields E output channels (j, s), ordered j*E + s. Its kernel has shape
(3, 3, J, E) for per-channel kernels ("no ws") or (3, 3, 1, E) when the E kernels are
shared by every j ("ws", the paper's default). Three implementations give the same
numbers:

* ``"grouped"``: one ``lax.conv_general_dilated`` with ``feature_group_count = J``.
* ``"shifted"``: nine strided slices of the zero-padded input, each times a kernel tap,
  summed. XLA fuses this with the BN and the product around it; it is the fast path
  on GPU (performance.md).
* ``"shifted_t"``: the same forward with a hand-written backward
  (:func:`shifted_transpose`): autodiff transposes the nine slices into nine padded
  partial sums that XLA writes out and adds (benchmarks/NOTES.md); the hand-written
  transpose gathers the nine taps of every input pixel in one reduction instead. Its
  gradients accumulate in float32 (autodiff's in the compute dtype).

Padding is 1 on every side (PyTorch's ``padding=1``), so a stride-2 D samples the input
at even coordinates, the same grid as ``u[:, ::2, ::2]``.

``layout="s_major"`` computes the same numbers with the hidden channels ordered
``s*J + j`` instead: input (B, H, W, S, J), output (B, Ho, Wo, E*J). The shifted form
builds the (E, J) products directly (no transpose), so the reductions that need the
hidden tensor per kernel ``s`` (the shared kernels' gradient) read ``j`` contiguously.
The grouped form with S = 1 can only produce j-major groups; it transposes its output.

``pin=True`` stores D's output in the row-major (channel-minor) physical layout, the one
its NHWC shape names, with ``jax.experimental.layout.with_layout_constraint``. Left
free, XLA's GPU layout assignment stores the hidden tensors of every block after the
first channel-major, (J, E, B, H, W), to suit the BatchNorm and kernel-gradient
reductions, and pays for it with transposed copies of the nine taps (benchmarks/NOTES.md,
"Experiment 4"). The numbers do not change: a layout is not a value.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.layout import Layout, with_layout_constraint

D_IMPLS = ("shifted", "grouped", "shifted_t")
HIDDEN_LAYOUTS = ("j_major", "s_major")
ACTIVATIONS = ("relu", "hardtanh", "hardball", "softball", "none")


def _out_size(n: int, stride: int) -> int:
  return (n - 1) // stride + 1


def derivative(x: jax.Array, kernel: jax.Array, stride: int = 1,
               impl: str = "shifted", layout: str = "j_major",
               pin: bool = False) -> jax.Array:
  """Applies D: ``x`` (B, H, W, J, S) times ``kernel`` (3, 3, J or 1, E).

  ``S`` is 1 (every input channel j yields E outputs: Eq.(3)-(6)) or E (hidden channel
  (j, s) is filtered by its own kernel (j, s): Eq.(7)). Returns (B, Ho, Wo, J*E).
  ``layout="s_major"``: ``x`` is (B, H, W, S, J) and the result (B, Ho, Wo, E*J), channel
  ``s*J + j``; the kernel keeps its shape (3, 3, J or 1, E). ``pin``: store the result
  row-major (see the module docstring).
  """
  out = _derivative(x, kernel, stride, impl, layout)
  return pin_row_major(out) if pin else out


def pin_row_major(x: jax.Array) -> jax.Array:
  """``x`` with its physical layout fixed to row-major (last axis minor)."""
  return with_layout_constraint(x, Layout(tuple(range(x.ndim))))


def _derivative(x, kernel, stride, impl, layout):
  if layout not in HIDDEN_LAYOUTS:
    raise ValueError(f"unknown hidden layout {layout!r}; choose one of {HIDDEN_LAYOUTS}")
  if x.ndim != 5:
    raise ValueError(f"derivative expects x of rank 5 (B, H, W, J, S) or, s_major, "
                     f"(B, H, W, S, J), got {x.shape}")
  smaj = layout == "s_major"
  if smaj:
    b, h, w, s, j = x.shape
  else:
    b, h, w, j, s = x.shape
  kh, kw, kj, e = kernel.shape
  if (kh, kw) != (3, 3) or kj not in (1, j) or s not in (1, e):
    raise ValueError(f"kernel {kernel.shape} does not fit input {x.shape} ({layout})")
  kernel = kernel.astype(x.dtype)
  ho, wo = _out_size(h, stride), _out_size(w, stride)
  if impl == "shifted":
    return _shifted(x, kernel, stride, smaj).reshape(b, ho, wo, j * e)
  if impl == "shifted_t":
    return _shifted_t(x, kernel, stride, smaj).reshape(b, ho, wo, j * e)
  if impl == "grouped":
    full = jnp.broadcast_to(kernel, (3, 3, j, e))
    if s == 1:
      inp, groups = x.reshape(b, h, w, j), j
      full = full.reshape(3, 3, 1, j * e)
    else:  # one kernel per input channel: channel multiplier 1, in the input's order
      inp, groups = x.reshape(b, h, w, j * e), j * e
      full = (jnp.swapaxes(full, 2, 3) if smaj else full).reshape(3, 3, 1, j * e)
    out = lax.conv_general_dilated(
        inp, full, window_strides=(stride, stride), padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    if smaj and s == 1:
      # A grouped conv writes each group's E outputs together (j-major): transpose.
      out = jnp.swapaxes(out.reshape(b, ho, wo, j, e), 3, 4).reshape(b, ho, wo, e * j)
    return out
  raise ValueError(f"unknown D implementation {impl!r}; choose one of {D_IMPLS}")


def _taps(x: jax.Array, stride: int, pad_value: float = 0.0):
  """The nine strided slices of ``x`` (B, H, W, ...) padded by one pixel with
  ``pad_value`` (0 for D; -inf for the stem's max-pool), tap t = 3*dy + dx: tap t at
  output (oy, ox) is input (stride*oy + dy - 1, stride*ox + dx - 1)."""
  h, w = x.shape[1:3]
  rest = x.ndim - 3
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1)) + ((0, 0),) * rest, constant_values=pad_value)
  return tap_slices(xp, stride, _out_size(h, stride), _out_size(w, stride))


def tap_slices(xp: jax.Array, stride: int, ho: int, wo: int):
  """The nine strided slices of ``xp`` (B, H + 2, W + 2, ...), an input already padded
  by one pixel, for an (ho, wo) output: :func:`_taps` without its pad (tap t = 3*dy +
  dx at output (oy, ox) is xp[stride*oy + dy, stride*ox + dx])."""
  b, rest = xp.shape[0], xp.ndim - 3
  return [lax.slice(xp, (0, dy, dx) + (0,) * rest,
                    (b, dy + stride * (ho - 1) + 1, dx + stride * (wo - 1) + 1)
                    + xp.shape[3:], (1, stride, stride) + (1,) * rest)
          for dy in range(3) for dx in range(3)]


def _shifted(x: jax.Array, kernel: jax.Array, stride: int, smaj: bool) -> jax.Array:
  """D in the shifted form, (B, Ho, Wo, J, E) or, s_major, (B, Ho, Wo, E, J)."""
  # s_major: each tap is (.., S, J) times the kernel as (E, J or 1), so the products
  # come out as (.., E, J) with no transpose.
  kt = jnp.swapaxes(kernel, 2, 3) if smaj else kernel
  out = None
  for t, tap in enumerate(_taps(x, stride)):
    term = tap * kt[t // 3, t % 3]
    out = term if out is None else out + term
  return out


def shifted_transpose(g: jax.Array, kt: jax.Array, stride: int, hw: tuple[int, int],
                      e_axis: int = -1, sum_e: bool = True) -> jax.Array:
  """D^T: the gradient of D's input from ``g``, the gradient of its (B, Ho, Wo, ., .)
  output, as a gather. ``kt`` (3, 3, ., .) is the kernel laid out like g's last two
  axes, ``hw`` the input's (H, W); e_axis is g's E axis, summed (keepdims) when the
  input has one channel per D group (``sum_e``). In float32 (float64 stays float64).

  A stride-s D reads padded input (s*oy + dy, s*ox + dx); its transpose is g dilated
  by s (s - 1 zeros between rows and columns), padded by one, then the correlation
  with the kernel: grad[y, x] = sum_t zp[y + 2 - dy, x + 2 - dx] * k_t. Written so,
  XLA can read every g element once and write the gradient once, where autodiff
  writes nine shifted partial results and adds them.
  """
  h, w = hw
  ho, wo = g.shape[1:3]
  dt = jnp.promote_types(g.dtype, jnp.float32)
  zp = lax.pad(g.astype(dt), jnp.zeros((), dt),
               ((0, 0, 0), (1, h - stride * (ho - 1), stride - 1),
                (1, w - stride * (wo - 1), stride - 1), (0, 0, 0), (0, 0, 0)))
  acc = None
  for dy in range(3):
    for dx in range(3):
      term = zp[:, 2 - dy:2 - dy + h, 2 - dx:2 - dx + w] * kt[dy, dx].astype(dt)
      acc = term if acc is None else acc + term
  if not sum_e:
    return acc
  # The sum over E as explicit adds, not a reduction: then it is a loop fusion, and XLA
  # fuses the add of the input's other gradient terms (the residual's) into it. As a
  # reduction it wrote this gradient and added it in a kernel of its own: 0.2 GB more
  # per stage-1 block of fuse_d_bn="xla" (benchmarks/NOTES.md, experiment 5).
  parts = [lax.slice_in_dim(acc, i, i + 1, axis=e_axis) for i in range(acc.shape[e_axis])]
  return functools.reduce(operator.add, parts)


def tap_products_sum(x: jax.Array, g: jax.Array, stride: int) -> jax.Array:
  """``[sum over (B, Ho, Wo) of tap_t(x) * g for t in 0..8]``, (9, ., .) in float32 (or
  wider): D's kernel gradient before any sum over J. ``x`` (B, H, W, ., .) is D's input,
  ``g`` (B, Ho, Wo, ., .) the gradient of its output (the taps broadcast against it).

  The nine products are stacked and summed in one reduction, so XLA reads g once.
  Written as nine sums, XLA fused them in pairs: five reductions, each reading g again
  (benchmarks/NOTES.md, "Experiment 4"). The stack's axis is the major one, as in
  ``d_bn_product._stacked_group_sums``: concatenated along the last axis, neighbouring
  threads of XLA's GPU reduction take different products, and a warp runs their
  branches one after the other (14x slower for the statistics on the H100, experiment
  11).
  """
  dt = jnp.promote_types(g.dtype, jnp.float32)
  gf = g.astype(dt)
  return jnp.stack([tap.astype(dt) * gf for tap in _taps(x, stride)]).sum((1, 2, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted_t(x, kernel, stride, smaj):
  """D in the shifted form with the hand-written transpose (impl "shifted_t")."""
  return _shifted(x, kernel, stride, smaj)


def _shifted_t_fwd(x, kernel, stride, smaj):
  return _shifted(x, kernel, stride, smaj), (x, kernel)


def _shifted_t_bwd(stride, smaj, res, g):
  x, kernel = res
  kt = jnp.swapaxes(kernel, 2, 3) if smaj else kernel  # laid out like g: (.., E, J)
  e_axis = -2 if smaj else -1
  j_axis = -1 if smaj else -2
  sum_e = x.shape[e_axis] == 1  # one input channel per D group (Eq.(3)-(6))
  # The kernels import this module.
  from qlhs_jax.kernels import d_bn_product as dbn, settings
  dot = dbn.du_pallas(x.shape[-2], g.shape[-1]) if sum_e and not smaj else None
  if dot is not None:
    if dbn.batch_shards() > 1:  # auto is "gather" there; only QLHS_DU_FORM=pallas is
      var = settings.name("QLHS_DU_FORM")
      raise ValueError(f"{var}={dbn.du_form(x.shape[-2], g.shape[-1])} with "
                       f"d_impl='shifted_t' runs on one device; this "
                       f"step splits the batch over {dbn.batch_shards()}. Unset {var} "
                       f"(auto: XLA's gather here) or run on one device")
    # The gather as a Pallas kernel (kernels.stencil): XLA's loop fusion of it ran at
    # 136 GB/s on the H100 (benchmarks/NOTES.md, experiment 12). The kernel takes the
    # j-major layout with one input channel per group; other inputs keep XLA's gather.
    from qlhs_jax.kernels import stencil
    k9 = dbn._kernel9(kernel, x.shape[-2])
    dx = stencil.d_transpose(g, k9, stride, x.shape[1:3], out_dtype=x.dtype,
                             dot=dot)[..., None]
  else:
    dx = shifted_transpose(g, kt, stride, x.shape[1:3], e_axis, sum_e).astype(x.dtype)
  # dL/dkernel[t] = sum over pixels of g * tap t; a shared kernel also sums over J.
  dk = tap_products_sum(x, g, stride)
  if kernel.shape[2] == 1:
    dk = dk.sum(j_axis, keepdims=True)
  dk = jnp.swapaxes(dk, 1, 2) if smaj else dk
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


_shifted_t.defvjp(_shifted_t_fwd, _shifted_t_bwd)


def subsample(x: jax.Array, stride: int) -> jax.Array:
  """A 1x1 convolution's stride: keep every ``stride``-th pixel (the grid D samples)."""
  return x if stride == 1 else x[:, ::stride, ::stride, :]


def activation(x: jax.Array, name: str) -> jax.Array:
  """The paper's activations (section 3). hardball and softball act on the channel
  vector of every pixel with radius R = sqrt(channels); their norm is taken in float32."""
  if name == "none":
    return x
  if name == "relu":
    return jax.nn.relu(x)
  if name == "hardtanh":
    return jnp.clip(x, -1, 1)
  if name in ("hardball", "softball"):
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    r2 = xf.shape[-1]  # R^2 = n
    sq = jnp.sum(xf * xf, axis=-1, keepdims=True)
    if name == "softball":
      scale = lax.rsqrt(1 + sq / r2)
    else:
      # x * min(1, R/|x|), written so that inside the ball the scale is exactly 1 and
      # no branch divides by |x| (finite gradients at x = 0).
      scale = jnp.sqrt(r2 / jnp.maximum(sq, r2))
    return (xf * scale).astype(x.dtype)
  raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")
