"""Building blocks shared by the QLHS models: the 3x3 operator D and the activations.

D is the paper's trainable "derivative": a depthwise 3x3 convolution in which every
input channel j yields E output channels (j, s), ordered j*E + s. Its kernel has shape
(3, 3, J, E) for per-channel kernels ("no ws") or (3, 3, 1, E) when the E kernels are
shared by every j ("ws", the paper's default). Two implementations give the same numbers:

* ``"grouped"``: one ``lax.conv_general_dilated`` with ``feature_group_count = J``.
* ``"shifted"``: nine strided slices of the zero-padded input, each times a kernel tap,
  summed. XLA fuses this with the BN and the product around it; it is the fast path
  on GPU (performance.md).

Padding is 1 on every side (PyTorch's ``padding=1``), so a stride-2 D samples the input
at even coordinates, the same grid as ``u[:, ::2, ::2]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

D_IMPLS = ("shifted", "grouped")
ACTIVATIONS = ("relu", "hardtanh", "hardball", "softball", "none")


def _out_size(n: int, stride: int) -> int:
  return (n - 1) // stride + 1


def derivative(x: jax.Array, kernel: jax.Array, stride: int = 1,
               impl: str = "shifted") -> jax.Array:
  """Applies D: ``x`` (B, H, W, J, S) times ``kernel`` (3, 3, J or 1, E).

  ``S`` is 1 (every input channel j yields E outputs: Eq.(3)-(6)) or E (hidden channel
  (j, s) is filtered by its own kernel (j, s): Eq.(7)). Returns (B, Ho, Wo, J*E).
  """
  if x.ndim != 5:
    raise ValueError(f"derivative expects x of rank 5 (B, H, W, J, S), got {x.shape}")
  b, h, w, j, s = x.shape
  kh, kw, kj, e = kernel.shape
  if (kh, kw) != (3, 3) or kj not in (1, j) or s not in (1, e):
    raise ValueError(f"kernel {kernel.shape} does not fit input {x.shape}")
  kernel = kernel.astype(x.dtype)
  ho, wo = _out_size(h, stride), _out_size(w, stride)
  if impl == "shifted":
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))
    out = None
    for dy in range(3):
      for dx in range(3):
        tap = lax.slice(xp, (0, dy, dx, 0, 0),
                        (b, dy + stride * (ho - 1) + 1, dx + stride * (wo - 1) + 1, j, s),
                        (1, stride, stride, 1, 1))
        term = tap * kernel[dy, dx]
        out = term if out is None else out + term
    return out.reshape(b, ho, wo, j * e)
  if impl == "grouped":
    full = jnp.broadcast_to(kernel, (3, 3, j, e)).reshape(3, 3, 1, j * e)
    if s == 1:
      inp, groups = x.reshape(b, h, w, j), j
    else:  # one kernel per input channel: channel multiplier 1
      inp, groups = x.reshape(b, h, w, j * e), j * e
    return lax.conv_general_dilated(
        inp, full, window_strides=(stride, stride), padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
  raise ValueError(f"unknown D implementation {impl!r}; choose one of {D_IMPLS}")


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
