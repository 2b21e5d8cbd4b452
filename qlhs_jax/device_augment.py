"""RandAugment on the device: the host draws each image's ops, the train step applies
them (``config.data.device_randaugment``).

The host's :class:`qlhs_jax.data.randaugment.RandAugment` draws from each image's own
generator exactly as it does when it applies the ops itself (:meth:`RandAugment.draw`),
and hands over per image and op slot an op code (:data:`OPS`, -1 for a slot whose op
was skipped), its argument and the resampling filter, instead of a transformed image.
The decode, crop and flip stay on the host, and RandAugment's Pillow work, 37-40% of a
pre-resized image's host time, moves into the jitted train step.

Each op does Pillow's arithmetic (checked against Pillow 13 in the tests):

* lookup tables: AutoContrast (each channel stretched from its lowest to its highest
  value), Equalize (Pillow's histogram steps), Invert, Posterize, Solarize, SolarizeAdd;
* ``Image.blend(degenerate, image, factor)`` in float32, truncated and clipped:
  Color (degenerate: Pillow's fixed-point grey), Contrast (the grey's mean, rounded),
  Brightness (black), Sharpness (Pillow's SMOOTH 3x3 filter, borders kept);
* affine resampling of the pixel centres (Rotate about the centre, ShearX/Y,
  TranslateX/YRel), bilinear or bicubic (Pillow's cubic, a = -1), taps clamped at the
  edges, points outside the image filled with the mean pixel.

Deviation, stated in the README: the geometric ops compute their coordinates in float32
where Pillow uses float64, and the filters truncate, so a value that is an integer in
exact arithmetic may come out 1 lower on one side and not on the other (up to 11% of a
translated image's values, 2% of a sheared one's); AutoContrast forms its table from an
exact quotient where Pillow truncates a float64 one (1 off, on 0.009% of values at
worst). The lookup and blend ops gave Pillow's exact values; XLA may contract a blend's
multiply and add on other backends. ``python -m qlhs_jax.benchmarks.augment`` prints
the figures, and the tests bound each against Pillow itself.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# Op codes of the device. timm's "Increasing" ops are the same operations with other
# level functions, so the host sends their arguments under the plain op's code.
OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd",
       "Color", "Contrast", "Brightness", "Sharpness",
       "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_LUT_OPS, _BLEND_OPS, _AFFINE_OPS = OPS[:6], OPS[6:10], OPS[10:]
SKIPPED = -1
RESAMPLES = ("bilinear", "bicubic")


def op_code(name: str) -> int:
  """The device code of a host op name (``"ColorIncreasing"`` -> Color's)."""
  base = name[:-len("Increasing")] if name.endswith("Increasing") else name
  return OPS.index(base)


def _histogram(img):
  """uint8 [H, W, 3] -> int32 [3, 256] counts per channel."""
  flat = img.reshape(-1, 3).astype(jnp.int32)
  rows = flat + 256 * jnp.arange(3, dtype=jnp.int32)
  return jnp.zeros(768, jnp.int32).at[rows.reshape(-1)].add(1).reshape(3, 256)


def _lut(hist, code, arg):
  """The [3, 256] lookup table of LUT op ``code`` with argument ``arg``."""
  i = jnp.arange(256, dtype=jnp.int32)
  present = hist > 0
  lo = jnp.argmax(present, axis=1)[:, None]
  hi = (255 - jnp.argmax(present[:, ::-1], axis=1))[:, None]
  # ImageOps.autocontrast: int(i * scale + offset) in float64, scale = 255 / (hi - lo);
  # the integer form below is the exact value it approximates.
  stretched = jnp.clip(((i - lo) * 255) // jnp.maximum(hi - lo, 1), 0, 255)
  autocontrast = jnp.where(hi > lo, stretched, i)
  # ImageOps.equalize: step = (total - count of the last present value) // 255;
  # lut[i] = (step // 2 + count below i) // step.
  last = jnp.take_along_axis(hist, hi, axis=1)
  step = (jnp.sum(hist, axis=1, keepdims=True) - last) // 255
  below = jnp.cumsum(hist, axis=1) - hist
  spread = (step // 2 + below) // jnp.maximum(step, 1)
  flat = (jnp.sum(present, axis=1, keepdims=True) <= 1) | (step == 0)
  equalize = jnp.where(flat, i, jnp.minimum(spread, 255))
  bits = jnp.clip(arg, 0, 8).astype(jnp.int32)
  posterize = jnp.where(bits >= 8, i, i & (~((1 << (8 - bits)) - 1) & 0xFF))
  thresh = arg.astype(jnp.int32)
  solarize = jnp.where(i < thresh, i, 255 - i)
  solarize_add = jnp.where(i < 128, jnp.minimum(255, i + arg.astype(jnp.int32)), i)
  tables = jnp.stack([autocontrast, equalize, jnp.broadcast_to(255 - i, (3, 256)),
                      jnp.broadcast_to(posterize, (3, 256)),
                      jnp.broadcast_to(solarize, (3, 256)),
                      jnp.broadcast_to(solarize_add, (3, 256))])
  return tables[jnp.clip(code, 0, len(_LUT_OPS) - 1)]


def _grey(x):
  """Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, int32 [H, W]."""
  return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16


def _smooth(x):
  """ImageFilter.SMOOTH ([1 1 1; 1 5 1; 1 1 1] / 13) of int32 [H, W, 3], summed in
  float32 and rounded half up, border pixels kept: Pillow's values in the tests."""
  h, w, _ = x.shape
  f = jnp.pad(x, ((1, 1), (1, 1), (0, 0))).astype(jnp.float32)
  acc = jnp.zeros(x.shape, jnp.float32)
  for dy in range(3):
    for dx in range(3):
      k = 5.0 if (dy, dx) == (1, 1) else 1.0
      acc = acc + f[dy:dy + h, dx:dx + w] * np.float32(k / 13.0)
  smooth = jnp.clip(jnp.floor(acc + 0.5), 0, 255).astype(jnp.int32)
  rows, cols = jnp.arange(h)[:, None, None], jnp.arange(w)[None, :, None]
  border = (rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1)
  return jnp.where(border, x, smooth)


def _blend(x, code, factor):
  """Image.blend(degenerate, image, factor) for blend op ``code`` (int32 images)."""
  grey = _grey(x)
  n = grey.size
  # ImageEnhance.Contrast: int(mean of the grey + 0.5), exactly.
  mean = (2 * jnp.sum(grey) + n) // (2 * n)
  k = code - len(_LUT_OPS)
  # A chain of selects, not an indexed stack: XLA fuses it into the pass that blends,
  # where it stored the stack of four degenerate images (+0.7 GB in the deviceless
  # compile of a batch of 256).
  degenerate = jnp.where(k == 0, grey[..., None],
                         jnp.where(k == 1, mean, jnp.where(k == 2, 0, _smooth(x))))
  d = degenerate.astype(jnp.float32)
  v = d + factor * (x.astype(jnp.float32) - d)
  return jnp.clip(jnp.trunc(v), 0, 255).astype(jnp.int32)


def _affine_matrix(code, arg, w, h):
  """Pillow's inverse affine matrix (a, b, c, d, e, f) of affine op ``code``: output
  pixel centre (x, y) samples the input at (a x + b y + c, d x + e y + f)."""
  k = code - len(_LUT_OPS) - len(_BLEND_OPS)
  one, zero = jnp.float32(1), jnp.float32(0)
  # Image.rotate(angle): about (w/2, h/2), the angle counter-clockwise in degrees.
  t = -arg * np.float32(math.pi / 180)
  cos, sin = jnp.cos(t), jnp.sin(t)
  cx, cy = np.float32(w / 2), np.float32(h / 2)
  rotate = jnp.stack([cos, sin, cos * -cx + sin * -cy + cx,
                      -sin, cos, -sin * -cx + cos * -cy + cy])
  matrices = jnp.stack([
      rotate,
      jnp.stack([one, arg, zero, zero, one, zero]),
      jnp.stack([one, zero, zero, arg, one, zero]),
      jnp.stack([one, zero, arg * w, zero, one, zero]),
      jnp.stack([one, zero, zero, zero, one, arg * h])])
  return matrices[jnp.clip(k, 0, len(_AFFINE_OPS) - 1)]


# The four taps' weights as cubics in the fraction t (coefficients of 1, t, t^2, t^3).
# Bicubic: Pillow's BICUBIC(v1..v4, t), Keys' cubic with a = -1; bilinear: the middle
# two taps, 1 - t and t. Each image selects its coefficients. In the deviceless compile
# (batch 256, 224 px, two ops) XLA stores the 8 weights per pixel either way, and the
# whole augmentation moves 2.2 GB; with the taps stacked into [H, W, 4] arrays it moved
# 4.2 GB, and with Pillow's own Horner forms and a select of the two results 3.5 GB.
_BICUBIC = ((0, -1, 2, -1), (1, 0, -2, 1), (0, 1, 1, -1), (0, 0, -1, 1))
_BILINEAR = ((0, 0, 0, 0), (1, -1, 0, 0), (0, 1, 0, 0), (0, 0, 0, 0))


def _weights(t, bicubic):
  coef = jnp.where(bicubic, jnp.asarray(_BICUBIC, jnp.float32),
                   jnp.asarray(_BILINEAR, jnp.float32))
  t2, t3 = t * t, t * t * t
  return [coef[k, 0] + coef[k, 1] * t + coef[k, 2] * t2 + coef[k, 3] * t3
          for k in range(4)]


def _affine(img, matrix, bicubic, fill):
  """Image.transform(AFFINE, matrix, BILINEAR or BICUBIC, fillcolor=fill) of uint8
  [H, W, 3], as int32: Pillow's filters, taps clamped at the edges, fill outside."""
  h, w, _ = img.shape
  a, b, c, d, e, f = (matrix[i] for i in range(6))
  ys = jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5
  xs = jnp.arange(w, dtype=jnp.float32)[None, :] + 0.5
  xin = a * xs + b * ys + c
  yin = d * xs + e * ys + f
  inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
  xf, yf = jnp.floor(xin - 0.5), jnp.floor(yin - 0.5)
  dx, dy = (xin - 0.5) - xf, (yin - 0.5) - yf
  wx, wy = _weights(dx, bicubic), _weights(dy, bicubic)
  x0, y0 = xf.astype(jnp.int32), yf.astype(jnp.int32)
  pixels = img.reshape(h * w, 3)
  cols = [jnp.clip(x0 + (k - 1), 0, w - 1) for k in range(4)]
  # Along x on each of the four rows, then along y, as Pillow does; every tap is its
  # own [H, W] expression (stacked taps were stored whole).
  v = jnp.zeros(img.shape, jnp.float32)
  for r in range(4):
    at_row = jnp.clip(y0 + (r - 1), 0, h - 1) * w
    row = jnp.zeros(img.shape, jnp.float32)
    for k in range(4):
      row = row + pixels[at_row + cols[k]].astype(jnp.float32) * wx[k][..., None]
    v = v + row * wy[r][..., None]
  # Pillow: (UINT8) v, truncated (bicubic after clipping to [0, 255]).
  out = jnp.clip(jnp.trunc(v), 0, 255).astype(jnp.int32)
  return jnp.where(inside[..., None], out, jnp.asarray(fill, jnp.int32))


def apply_op(img: jax.Array, code: jax.Array, arg: jax.Array, resample: jax.Array,
             fill) -> jax.Array:
  """One op on one uint8 ``[H, W, 3]`` image; ``code`` -1 leaves it as it is."""
  h, w, _ = img.shape
  x = img.astype(jnp.int32)
  arg = jnp.asarray(arg, jnp.float32)
  lut = _lut(_histogram(img), code, arg)
  looked_up = jnp.stack([lut[ch][x[..., ch]] for ch in range(3)], -1)
  blended = _blend(x, code, arg)
  moved = _affine(img, _affine_matrix(code, arg, w, h), resample == 1, fill)
  out = jnp.where(code < len(_LUT_OPS), looked_up,
                  jnp.where(code < len(_LUT_OPS) + len(_BLEND_OPS), blended, moved))
  return jnp.where(code == SKIPPED, img, out.astype(jnp.uint8))


def randaugment(images: jax.Array, ops: jax.Array, args: jax.Array,
                resamples: jax.Array, fill) -> jax.Array:
  """Applies each image's drawn ops in order: uint8 ``[B, H, W, 3]``, int32 ``ops``
  and ``resamples`` and float32 ``args`` of shape ``[B, N]`` (the pipeline's
  ``ra_op``, ``ra_resample``, ``ra_arg``)."""
  one = lambda img, op, arg, rs: apply_op(img, op, arg, rs, fill)
  for slot in range(ops.shape[1]):
    images = jax.vmap(one)(images, ops[:, slot], args[:, slot], resamples[:, slot])
  return images
