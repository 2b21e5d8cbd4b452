"""Data options: :func:`default_config` (the recipe) and :func:`digits_config`."""

from __future__ import annotations

import difflib
import os

import ml_collections

from qlhs_jax.data import randaugment as ra
from qlhs_jax.data import sources
from qlhs_jax.data import transforms


def default_config() -> ml_collections.ConfigDict:
  """Every data option, with the recipe's values (timm's ImageNet transforms).

  The returned ConfigDict is locked: assigning a key that does not exist raises.

  Dataset:
    name: 'imagenet2012' (TFDS, array_record), 'folder' (ImageNet-style folder),
      'imagenet_resized' (written by ``python -m qlhs_jax.data.prepare``) or 'digits'
      (scikit-learn's handwritten digits, no download).
    data_dir: TFDS data_dir ($TFDS_DATA_DIR, else ~/tensorflow_datasets).
    folder: root of an ImageNet-style folder (train/<class>/*, val/<class>/*).
    resized_dir: output directory of ``qlhs_jax.data.prepare``.
    wnids: the classes, in label order: None, a list of ids or a path to a file of
      ids (one per line). None means ImageNet-100 (the CMC list shipped as
      ``IMAGENET100_WNIDS_FILE``) for 'imagenet2012', and every class present for
      'folder' and 'imagenet_resized'. Ignored by 'digits'.
    index_cache_dir: where 'imagenet2012' caches the labels it reads once per split
      ('' = no cache).
  Image size and evaluation:
    image_size: side of the square crop (train and eval).
    crop_pct: eval resizes the short side to floor(image_size / crop_pct), then
      centre-crops image_size.
    eval_interpolation: 'bicubic', 'bilinear', 'nearest', 'lanczos', 'box', 'hamming'.
  Train augmentation (timm's names):
    train_interpolation: 'random' (bilinear or bicubic per image, also inside
      RandAugment) or a fixed filter as above.
    rrc_scale, rrc_ratio: RandomResizedCrop area fraction and aspect ratio ranges.
    hflip: probability of a horizontal flip (0 turns it off).
    randaugment: timm's RandAugment string, '' for none.
    reprob, remode, recount: RandomErasing probability, fill mode ('pixel', 'rand',
      'const') and maximum number of boxes (1..recount per erased image).
    mean, std: normalisation, per channel, on [0, 1] pixels (ImageNet's).
    jpeg_draft: decode JPEGs at 1/2, 1/4 or 1/8 size when the crop will be
      downscaled by at least that much (faster, slightly different pixels).
    device_normalize: train batches carry the uint8 images (and erasing's boxes and
      seeds); the train step normalises and erases on the device
      (``qlhs_jax.device_input``). A quarter of the bytes per image through worker
      processes and to the device, and no float work on the host. The erased boxes'
      noise then comes from the device's generator: the same distribution, other
      values. Validation batches are float32 either way. The training configs set it.
    erase_noise: with device_normalize, the generator of 'pixel' fills: 'hash' (a
      counter hash of seed and position, ~12 integer operations a value) or 'threefry'
      (``jax.random.normal``, ~130; the only one before 2026-12-05: a run begun then
      resumes exactly with it). ``qlhs_jax.device_input``.
    device_randaugment: with device_normalize, the host only draws each image's
      RandAugment ops (``ra_op``, ``ra_arg``, ``ra_resample``) and the train step
      applies them (``qlhs_jax.device_augment``): 1.25-1.67x the host's rate on
      pre-resized images (2-core VM), for ops that match Pillow's to within 1 on a few
      values (README, Data). Off by default.
  Loading:
    workers: grain worker processes (0 = in this process).
    read_threads: threads per process computing batches concurrently.
    prefetch: batches buffered per worker process.
  """
  cache_home = os.environ.get("XDG_CACHE_HOME", "~/.cache")
  config = ml_collections.ConfigDict(dict(
      name="imagenet2012",
      data_dir=os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"),
      folder="",
      resized_dir="",
      wnids=None,
      index_cache_dir=os.path.join(cache_home, "qlhs_jax"),
      image_size=224,
      crop_pct=0.875,
      eval_interpolation="bicubic",
      train_interpolation="random",
      rrc_scale=(0.08, 1.0),
      rrc_ratio=(3 / 4, 4 / 3),
      hflip=0.5,
      randaugment="rand-m7-mstd0.5-inc1",
      reprob=0.4,
      remode="pixel",
      recount=3,
      mean=transforms.IMAGENET_MEAN,
      std=transforms.IMAGENET_STD,
      jpeg_draft=False,
      device_normalize=False,
      erase_noise="hash",
      device_randaugment=False,
      workers=0,
      read_threads=2,
      prefetch=2,
  ))
  config.lock()
  return config


def digits_config(image_size: int = 32) -> ml_collections.ConfigDict:
  """The embedded dataset with mild augmentation, for the quickstart and tests.

  Digits are centred 8x8 strokes: no flip (it changes their meaning), no RandAugment
  or erasing, a RandomResizedCrop keeping at least 35% of the area, and eval on the
  whole image (crop_pct 1). Normalised with the ImageNet mean/std like every dataset.
  """
  config = default_config()
  config.name = "digits"
  config.image_size = image_size
  config.crop_pct = 1.0
  config.rrc_scale = (0.35, 1.0)
  config.hflip = 0.0
  config.randaugment = ""
  config.reprob = 0.0
  return config


_CHOICES = {
    "name": sources.SOURCES,
    "remode": ("pixel", "rand", "const"),
    "erase_noise": ("hash", "threefry"),
}


def reject_unknown_keys(config, known, what: str) -> None:
  """Raises ValueError naming every key of ``config`` not in ``known``, with the
  closest known key as a hint (shared by the data and the training config)."""
  unknown = sorted(set(config.keys()) - set(known.keys()))
  if unknown:
    hints = {k: difflib.get_close_matches(k, known.keys(), 1) for k in unknown}
    raise ValueError(f"Unknown {what} key(s): " + ", ".join(
        f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items()))


def validate(config) -> None:
  """Raises ValueError on an unknown key or a value the pipeline cannot honour."""
  known = default_config()
  reject_unknown_keys(config, known, "data config")
  missing = sorted(set(known.keys()) - set(config.keys()))
  if missing:
    raise ValueError(f"Data config lacks key(s) {missing}; start from default_config()")
  for key, choices in _CHOICES.items():
    if config[key] not in choices:
      raise ValueError(f"config.data.{key}={config[key]!r}; expected one of {choices}")
  transforms.interpolation(config.train_interpolation)
  if config.eval_interpolation not in transforms.INTERPOLATIONS:
    raise ValueError(f"config.data.eval_interpolation={config.eval_interpolation!r}; "
                     f"expected one of {sorted(transforms.INTERPOLATIONS)}")
  ra.parse(config.randaugment)
  checks = [
      ("image_size", config.image_size >= 1),
      ("crop_pct", 0 < config.crop_pct <= 1),
      ("rrc_scale", 0 < config.rrc_scale[0] <= config.rrc_scale[1] <= 1),
      ("rrc_ratio", 0 < config.rrc_ratio[0] <= config.rrc_ratio[1]),
      ("hflip", 0 <= config.hflip <= 1),
      ("reprob", 0 <= config.reprob <= 1),
      ("recount", config.recount >= 1),
      ("mean", len(config.mean) == 3),
      ("std", len(config.std) == 3 and min(config.std) > 0),
      ("workers", config.workers >= 0),
      ("read_threads", config.read_threads >= 0),
      ("prefetch", config.prefetch >= 1),
      ("device_normalize", isinstance(config.device_normalize, bool)),
      ("device_randaugment", isinstance(config.device_randaugment, bool)),
  ]
  bad = [k for k, ok in checks if not ok]
  if bad:
    raise ValueError("Invalid data config value(s): " +
                     ", ".join(f"{k}={config[k]!r}" for k in bad))
  if config.device_randaugment and not config.device_normalize:
    raise ValueError("config.data.device_randaugment=True needs "
                     "config.data.device_normalize=True (the device applies RandAugment "
                     "to the uint8 images it normalises)")
  if config.device_randaugment and config.train_interpolation not in (
      "random", "bilinear", "bicubic"):
    raise ValueError(
        f"config.data.device_randaugment=True resamples bilinear or bicubic, not "
        f"config.data.train_interpolation={config.train_interpolation!r}; set "
        "train_interpolation to 'random', 'bilinear' or 'bicubic', or "
        "device_randaugment=False")
