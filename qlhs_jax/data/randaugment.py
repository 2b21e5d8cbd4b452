"""RandAugment with timm's semantics, on Pillow images.

A port of the RandAugment of timm's ``auto_augment.py`` (v0.9), written from its
documented behaviour: a config string such as ``"rand-m7-mstd0.5-inc1"`` means two ops
per image (``n2``, the default), chosen uniformly *with replacement* from the op set,
each applied with probability 0.5 (``p0.5``); each applied op draws its own magnitude
from N(7, 0.5) (``m7``, ``mstd0.5``), clipped to [0, 10] (``mmax``, default 10), and maps
it to the op's argument with timm's level functions. ``inc1`` selects the "increasing"
op set, whose strength grows with the magnitude. Geometric ops fill with the mean pixel
and resample bilinear or bicubic at random, as timm does when the train interpolation
is "random".

All randomness comes from the ``numpy.random.Generator`` passed in, so the result is a
function of that generator's seed alone.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_LEVEL_DENOM = 10.0
_RANDOM_RESAMPLE = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS, in timm's order.
RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
    "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel")


@dataclasses.dataclass(frozen=True)
class _Ctx:
  """What an op may need besides its argument."""
  rng: np.random.Generator
  fill: tuple[int, int, int]
  resample: Optional[Image.Resampling]  # None: bilinear or bicubic at random

  def pick_resample(self) -> Image.Resampling:
    if self.resample is not None:
      return self.resample
    return _RANDOM_RESAMPLE[int(self.rng.integers(2))]


# --- Ops: (image, argument, ctx) -> image. -------------------------------------------

def _affine(img, matrix, ctx):
  return img.transform(img.size, Image.Transform.AFFINE, matrix,
                       resample=ctx.pick_resample(), fillcolor=ctx.fill)


def _shear_x(img, factor, ctx):
  return _affine(img, (1, factor, 0, 0, 1, 0), ctx)


def _shear_y(img, factor, ctx):
  return _affine(img, (1, 0, 0, factor, 1, 0), ctx)


def _translate_x_rel(img, pct, ctx):
  return _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), ctx)


def _translate_y_rel(img, pct, ctx):
  return _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), ctx)


def _rotate(img, degrees, ctx):
  return img.rotate(degrees, resample=ctx.pick_resample(), fillcolor=ctx.fill)


def _solarize_add(img, add, ctx, thresh=128):
  del ctx
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  return img.point(lut * len(img.getbands()))


def _posterize(img, bits, ctx):
  # ImageOps.posterize as in Pillow < 11; newer Pillow rejects bits=0, which timm's
  # PosterizeIncreasing reaches at magnitude 10 (every pixel becomes 0).
  del ctx
  if bits >= 8:
    return img
  mask = ~(2 ** (8 - bits) - 1) & 0xFF
  return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _enhance(enhancer):
  return lambda img, factor, ctx: enhancer(img).enhance(factor)


_OPS: dict[str, Callable] = {
    "AutoContrast": lambda img, ctx: ImageOps.autocontrast(img),
    "Equalize": lambda img, ctx: ImageOps.equalize(img),
    "Invert": lambda img, ctx: ImageOps.invert(img),
    "Rotate": _rotate,
    "Posterize": _posterize,
    "PosterizeIncreasing": _posterize,
    "Solarize": lambda img, thresh, ctx: ImageOps.solarize(img, thresh),
    "SolarizeIncreasing": lambda img, thresh, ctx: ImageOps.solarize(img, thresh),
    "SolarizeAdd": _solarize_add,
    "Color": _enhance(ImageEnhance.Color),
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x_rel,
    "TranslateYRel": _translate_y_rel,
}


# --- Level functions: magnitude in [0, 10] -> op argument (timm's). -------------------

def _negate_half(v, rng):
  # timm: `-v if random.random() > 0.5 else v`.
  return -v if rng.random() > 0.5 else v


def _posterize_level(m, rng):
  return int(m / _LEVEL_DENOM * 4)


def _solarize_level(m, rng):
  return min(256, int(m / _LEVEL_DENOM * 256))


_LEVELS: dict[str, Optional[Callable[[float, np.random.Generator], float]]] = {
    "AutoContrast": None,
    "Equalize": None,
    "Invert": None,
    "Rotate": lambda m, rng: _negate_half(m / _LEVEL_DENOM * 30.0, rng),
    # Keeps 0 to 4 bits: weaker with magnitude.
    "Posterize": _posterize_level,
    # Keeps 4 down to 0 bits: stronger with magnitude (4 bits at magnitude 0).
    "PosterizeIncreasing": lambda m, rng: 4 - _posterize_level(m, rng),
    "Solarize": _solarize_level,
    "SolarizeIncreasing": lambda m, rng: 256 - _solarize_level(m, rng),
    "SolarizeAdd": lambda m, rng: min(128, int(m / _LEVEL_DENOM * 110)),
    **{name: (lambda m, rng: m / _LEVEL_DENOM * 1.8 + 0.1)
       for name in ("Color", "Contrast", "Brightness", "Sharpness")},
    **{name + "Increasing":
       (lambda m, rng: max(0.1, 1.0 + _negate_half(m / _LEVEL_DENOM * 0.9, rng)))
       for name in ("Color", "Contrast", "Brightness", "Sharpness")},
    "ShearX": lambda m, rng: _negate_half(m / _LEVEL_DENOM * 0.3, rng),
    "ShearY": lambda m, rng: _negate_half(m / _LEVEL_DENOM * 0.3, rng),
    "TranslateXRel": lambda m, rng: _negate_half(m / _LEVEL_DENOM * 0.45, rng),
    "TranslateYRel": lambda m, rng: _negate_half(m / _LEVEL_DENOM * 0.45, rng),
}


def apply_op(img: Image.Image, name: str, magnitude: float, rng: np.random.Generator,
             fill: Sequence[int] = (128, 128, 128),
             resample: Optional[Image.Resampling] = None) -> Image.Image:
  """Applies op ``name`` at ``magnitude`` (0-10) unconditionally, as timm would."""
  ctx = _Ctx(rng=rng, fill=tuple(int(v) for v in fill), resample=resample)
  level = _LEVELS[name]
  if level is None:
    return _OPS[name](img, ctx)
  return _OPS[name](img, level(magnitude, rng), ctx)


# The ops that resample (and draw their filter when it is random).
GEOMETRIC = frozenset(("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"))


@dataclasses.dataclass(frozen=True)
class DrawnOp:
  """One op as drawn for one image: its argument (None for AutoContrast, Equalize and
  Invert) and, for the geometric ops, the resampling filter."""
  name: str
  arg: Optional[float]
  resample: Optional[Image.Resampling]


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """timm's RandAugment; build it with :func:`parse`."""
  ops: tuple[str, ...]
  num_ops: int = 2
  prob: float = 0.5
  magnitude: float = 10.0
  magnitude_std: float = 0.0
  magnitude_max: float = _LEVEL_DENOM
  fill: tuple[int, int, int] = (128, 128, 128)
  resample: Optional[Image.Resampling] = None

  def draw(self, rng: np.random.Generator) -> list[Optional[DrawnOp]]:
    """The ops one image gets, None for a slot whose op was skipped: the same draws
    from ``rng``, in the same order, as timm's RandAugment makes while it applies
    them (the ops themselves draw nothing but a random filter)."""
    chosen = rng.choice(len(self.ops), self.num_ops, replace=True)
    drawn = []
    for k in chosen:
      if self.prob < 1.0 and rng.random() > self.prob:
        drawn.append(None)
        continue
      m = self.magnitude
      if self.magnitude_std == math.inf:
        m = rng.uniform(0.0, m)
      elif self.magnitude_std > 0:
        m = rng.normal(m, self.magnitude_std)
      m = min(max(0.0, m), self.magnitude_max)
      name = self.ops[k]
      level = _LEVELS[name]
      arg = None if level is None else level(m, rng)
      resample = None
      if name in GEOMETRIC:
        resample = _Ctx(rng, self.fill, self.resample).pick_resample()
      drawn.append(DrawnOp(name, arg, resample))
    return drawn

  def apply(self, img: Image.Image, drawn: Sequence[Optional[DrawnOp]]) -> Image.Image:
    """Applies ops from :meth:`draw` with Pillow."""
    for op in drawn:
      if op is None:
        continue
      ctx = _Ctx(rng=None, fill=self.fill, resample=op.resample)
      img = (_OPS[op.name](img, ctx) if op.arg is None
             else _OPS[op.name](img, op.arg, ctx))
    return img

  def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return self.apply(img, self.draw(rng))


# The op codes of :mod:`qlhs_jax.device_augment` (its OPS, which cannot be imported
# here: the host's workers do not import jax). "Increasing" ops send their argument
# under the plain op's code; -1 marks a skipped slot.
DEVICE_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd",
              "Color", "Contrast", "Brightness", "Sharpness",
              "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
DEVICE_RESAMPLES = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


def device_arrays(drawn: Sequence[Optional[DrawnOp]]) -> dict[str, np.ndarray]:
  """Drawn ops -> the example's ``ra_op`` (int32 device op code, -1 skipped),
  ``ra_arg`` (float32) and ``ra_resample`` (int32: 0 bilinear, 1 bicubic)."""
  n = len(drawn)
  ops, args, resamples = np.full(n, -1, np.int32), np.zeros(n, np.float32), np.zeros(
      n, np.int32)
  for i, op in enumerate(drawn):
    if op is None:
      continue
    base = op.name[:-len("Increasing")] if op.name.endswith("Increasing") else op.name
    ops[i] = DEVICE_OPS.index(base)
    args[i] = 0.0 if op.arg is None else op.arg
    if op.resample is not None:
      if op.resample not in DEVICE_RESAMPLES:
        raise ValueError(f"RandAugment on the device resamples bilinear or bicubic, "
                         f"not {op.resample.name}; set config.data.train_interpolation "
                         "to 'random', 'bilinear' or 'bicubic', or "
                         "config.data.device_randaugment=False")
      resamples[i] = DEVICE_RESAMPLES.index(op.resample)
  return {"ra_op": ops, "ra_arg": args, "ra_resample": resamples}


def parse(spec: str, fill: Sequence[int] = (128, 128, 128),
          resample: Optional[Image.Resampling] = None) -> Optional[RandAugment]:
  """Parses timm's RandAugment string, e.g. ``"rand-m7-mstd0.5-inc1"``; '' gives None.

  Keys: ``m`` magnitude, ``n`` ops per image, ``mstd`` magnitude std (> 100 means
  uniform in [0, m]), ``mmax`` magnitude upper bound, ``p`` per-op probability, ``inc``
  1 for the increasing op set.
  """
  if not spec:
    return None
  parts = spec.split("-")
  if parts[0] != "rand":
    raise ValueError(f"RandAugment spec must start with 'rand-', got {spec!r}")
  kw = {}
  increasing = False
  for part in parts[1:]:
    match = re.fullmatch(r"([a-z]+)([0-9.]+)", part)
    if not match:
      raise ValueError(f"Cannot parse {part!r} in RandAugment spec {spec!r}")
    key, val = match.groups()
    if key == "m":
      kw["magnitude"] = float(val)
    elif key == "n":
      kw["num_ops"] = int(val)
    elif key == "mstd":
      std = float(val)
      kw["magnitude_std"] = math.inf if std > 100 else std
    elif key == "mmax":
      kw["magnitude_max"] = float(val)
    elif key == "p":
      kw["prob"] = float(val)
    elif key == "inc":
      increasing = bool(int(float(val)))
    else:
      raise ValueError(f"Unknown key {key!r} in RandAugment spec {spec!r} "
                       "(known: m, n, mstd, mmax, p, inc)")
  ops = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
  return RandAugment(ops=ops, fill=tuple(int(v) for v in fill), resample=resample, **kw)
