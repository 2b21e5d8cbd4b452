"""Image transforms of the recipe (timm's ImageNet train and eval transforms), in Pillow.

Train: RandomResizedCrop (timm's ``RandomResizedCropAndInterpolation``), horizontal
flip, RandAugment (:mod:`qlhs_jax.data.randaugment`), normalisation, RandomErasing.
Eval: resize the short side to ``floor(size / crop_pct)``, centre crop ``size``
(torchvision's ``Resize`` + ``CenterCrop`` geometry).

Every random decision is drawn from the ``numpy.random.Generator`` passed in; the
pipeline seeds it from (seed, epoch, record index), so an image's augmentation does not
depend on the worker that computes it.

Crop-and-resize is one ``Image.resize(size, box=...)`` call: Pillow takes the filter
support from the whole image, not just the box, so the eval crop equals resizing the
whole image and then cropping (up to the rounding of Pillow's 8-bit intermediate
pass), without computing the pixels that the crop throws away.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from typing import Any, Optional

import numpy as np
from PIL import Image

from qlhs_jax.data import randaugment as ra
from qlhs_jax.data.errors import InvalidDataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_RANDOM_INTERPOLATION = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


def interpolation(name: str) -> Optional[Image.Resampling]:
  """Pillow filter for ``name``; None for timm's ``"random"`` (bilinear or bicubic)."""
  if name == "random":
    return None
  if name not in INTERPOLATIONS:
    raise ValueError(f"Unknown interpolation {name!r}; expected 'random' or one of "
                     f"{sorted(INTERPOLATIONS)}")
  return INTERPOLATIONS[name]


def open_image(payload: Any) -> Image.Image:
  """A Pillow image from encoded bytes or a uint8 array (H, W) / (H, W, 3).

  Encoded images are opened lazily (header only), so that :meth:`Image.draft` can still
  pick a reduced JPEG decoding size.
  """
  if isinstance(payload, np.ndarray):
    return Image.fromarray(payload)
  try:
    return Image.open(io.BytesIO(payload))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise InvalidDataError(f"Cannot read image: {type(e).__name__}: {e}") from e


def decode_rgb(img: Image.Image) -> Image.Image:
  """Decodes ``img`` to RGB (CMYK, grayscale, palette and alpha images included)."""
  try:
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise InvalidDataError(f"Cannot decode image: {type(e).__name__}: {e}") from e


def jpeg_draft(img: Image.Image, request: tuple[float, float]) -> float:
  """Lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale if the result stays at least
  ``request`` (width, height). Returns the reduction factor (1 if none)."""
  if img.format != "JPEG":
    return 1.0
  w0 = img.size[0]
  img.draft("RGB", (max(1, math.ceil(request[0])), max(1, math.ceil(request[1]))))
  return w0 / img.size[0]


def rrc_params(rng: np.random.Generator, width: int, height: int,
               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """timm's RandomResizedCrop box ``(left, top, w, h)``: ten tries at an area fraction
  ``U(scale)`` and a log-uniform aspect ratio, then a centre crop fallback."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = rng.uniform(*scale) * area
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def eval_geometry(width: int, height: int, size: int,
                  crop_pct: float) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
  """torchvision's Resize(floor(size / crop_pct)) + CenterCrop(size) geometry.

  Returns the resized (width, height) and the crop box (left, top, right, bottom) in
  resized coordinates.
  """
  short = math.floor(size / crop_pct)
  if width <= height:
    new_w, new_h = short, int(short * height / width)
  else:
    new_w, new_h = int(short * width / height), short
  left = int(round((new_w - size) / 2.0))
  top = int(round((new_h - size) / 2.0))
  return (new_w, new_h), (left, top, left + size, top + size)


@functools.lru_cache(maxsize=16)
def _normalizer(shape: tuple[int, ...], mean: tuple[float, ...],
                std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
  # Full-size scale and offset arrays: element-wise ops on whole arrays are ~10x
  # faster in NumPy than broadcasting a length-3 channel axis.
  scale = np.broadcast_to(np.asarray([1.0 / (255.0 * s) for s in std], np.float32),
                          shape).copy()
  offset = np.broadcast_to(np.asarray([m / s for m, s in zip(mean, std)], np.float32),
                           shape).copy()
  return scale, offset


def normalize(img: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
  """uint8 (H, W, 3) -> float32 ``(x / 255 - mean) / std``."""
  scale, offset = _normalizer(img.shape, tuple(mean), tuple(std))
  out = img.astype(np.float32)
  out *= scale
  out -= offset
  return out


def _erasing_boxes(rng: np.random.Generator, h_img: int, w_img: int, prob: float,
                   min_count: int, max_count: int, min_area: float, max_area: float,
                   min_aspect: float):
  """timm's RandomErasing boxes ``(top, left, h, w)``, drawn lazily: a caller that
  draws each box's fill from ``rng`` before taking the next box consumes the stream as
  timm's loop does."""
  if rng.random() > prob:
    return
  area = h_img * w_img
  count = min_count if min_count == max_count else int(
      rng.integers(min_count, max_count + 1))
  log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
  for _ in range(count):
    for _ in range(10):
      target_area = rng.uniform(min_area, max_area) * area / count
      aspect = math.exp(rng.uniform(*log_aspect))
      h = int(round(math.sqrt(target_area * aspect)))
      w = int(round(math.sqrt(target_area / aspect)))
      if w < w_img and h < h_img:
        top = int(rng.integers(0, h_img - h + 1))
        left = int(rng.integers(0, w_img - w + 1))
        yield top, left, h, w
        break


def random_erasing(img: np.ndarray, rng: np.random.Generator, prob: float = 0.4,
                   mode: str = "pixel", min_count: int = 1, max_count: int = 3,
                   min_area: float = 0.02, max_area: float = 1 / 3,
                   min_aspect: float = 0.3) -> np.ndarray:
  """timm's RandomErasing on a normalised float (H, W, C) image, in place.

  With probability ``prob``: ``U{min_count..max_count}`` boxes, each of area
  ``U(min_area, max_area) * H * W / count`` and log-uniform aspect in
  [min_aspect, 1 / min_aspect] (ten tries each), filled per ``mode``: 'pixel' N(0, 1)
  per pixel and channel, 'rand' N(0, 1) per channel, 'const' zeros.
  """
  h_img, w_img, chans = img.shape
  for top, left, h, w in _erasing_boxes(rng, h_img, w_img, prob, min_count, max_count,
                                        min_area, max_area, min_aspect):
    if mode == "pixel":
      fill = rng.standard_normal((h, w, chans), dtype=np.float32)
    elif mode == "rand":
      fill = rng.standard_normal((1, 1, chans), dtype=np.float32)
    else:
      fill = 0.0
    img[top:top + h, left:left + w] = fill
  return img


def erasing_boxes(rng: np.random.Generator, h_img: int, w_img: int, prob: float = 0.4,
                  min_count: int = 1, max_count: int = 3) -> np.ndarray:
  """The boxes of :func:`random_erasing` (same distribution, timm's default areas and
  aspects) without their fills, for erasing on the device
  (:func:`qlhs_jax.device_input.normalize_and_erase`): int32 ``[max_count, 4]`` rows of
  ``(top, left, height, width)`` in drawing order, unused rows zero."""
  boxes = np.zeros((max_count, 4), np.int32)
  for k, box in enumerate(_erasing_boxes(rng, h_img, w_img, prob, min_count, max_count,
                                         0.02, 1 / 3, 0.3)):
    boxes[k] = box
  return boxes


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """Encoded image or uint8 array -> augmented, normalised float32 (size, size, 3)."""
  size: int
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  interpolation: Optional[Image.Resampling] = None  # None: bilinear/bicubic at random
  hflip: float = 0.5
  randaugment: Optional[ra.RandAugment] = None
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  reprob: float = 0.0
  remode: str = "pixel"
  recount: int = 1
  jpeg_draft: bool = False
  device_randaugment: bool = False

  def augment(self, payload: Any, rng: np.random.Generator,
              randaugment: bool = True) -> Image.Image:
    """The uint8 part: crop, flip, RandAugment (unless ``randaugment`` is False).
    Returns an RGB (size, size) image."""
    img = open_image(payload)
    left, top, w, h = rrc_params(rng, img.size[0], img.size[1], self.scale, self.ratio)
    resample = self.interpolation
    if resample is None:
      resample = _RANDOM_INTERPOLATION[int(rng.integers(2))]
    if self.jpeg_draft:
      # Decode at the smallest DCT scale that keeps the crop at least `size` wide.
      f = jpeg_draft(img, (img.size[0] * self.size / w, img.size[1] * self.size / h))
      left, top, w, h = left / f, top / f, w / f, h / f
    img = decode_rgb(img)
    img = img.resize((self.size, self.size), resample, box=(left, top, left + w, top + h))
    if self.hflip > 0 and rng.random() < self.hflip:
      img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if randaugment and self.randaugment is not None:
      img = self.randaugment(img, rng)
    return img

  def __call__(self, payload: Any, rng: np.random.Generator) -> np.ndarray:
    out = normalize(np.asarray(self.augment(payload, rng)), self.mean, self.std)
    if self.reprob > 0:
      random_erasing(out, rng, self.reprob, self.remode, 1, self.recount)
    return out

  def device_example(self, payload: Any, rng: np.random.Generator) -> dict[str, Any]:
    """The host half of ``device_normalize``: the uint8 image (crop, flip and, unless
    ``device_randaugment``, RandAugment; with it, the ops drawn for the image,
    :func:`qlhs_jax.data.randaugment.device_arrays`) and, where erasing is on, its
    boxes (:func:`erasing_boxes`) and a uint32 seed for their fills. The generator
    is drawn from in the same order either way. :mod:`qlhs_jax.device_input` does
    the rest on the device."""
    on_device = self.device_randaugment and self.randaugment is not None
    example = {"image": np.asarray(self.augment(payload, rng, not on_device), np.uint8)}
    if on_device:
      example.update(ra.device_arrays(self.randaugment.draw(rng)))
    if self.reprob > 0:
      h, w = example["image"].shape[:2]
      example["erase"] = erasing_boxes(rng, h, w, self.reprob, 1, self.recount)
      example["erase_seed"] = rng.integers(0, 2**32, dtype=np.uint32)
    return example


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """Encoded image or uint8 array -> centre crop, normalised float32 (size, size, 3)."""
  size: int
  crop_pct: float = 0.875
  interpolation: Image.Resampling = Image.Resampling.BICUBIC
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  jpeg_draft: bool = False

  def crop(self, payload: Any) -> Image.Image:
    """The uint8 part: resize the short side, centre crop. Returns an RGB image."""
    img = open_image(payload)
    (new_w, new_h), (l, t, r, b) = eval_geometry(img.size[0], img.size[1], self.size,
                                                 self.crop_pct)
    if self.jpeg_draft:
      jpeg_draft(img, (new_w, new_h))
    img = decode_rgb(img)
    # The crop box in source coordinates: resized coordinate x is source x * sx.
    sx, sy = img.size[0] / new_w, img.size[1] / new_h
    return img.resize((self.size, self.size), self.interpolation,
                      box=(l * sx, t * sy, r * sx, b * sy))

  def __call__(self, payload: Any,
               rng: Optional[np.random.Generator] = None) -> np.ndarray:
    del rng  # Deterministic.
    return normalize(np.asarray(self.crop(payload)), self.mean, self.std)
