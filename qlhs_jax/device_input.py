"""The device half of ``device_normalize``: uint8 train batches become normalised
float32 images inside the jitted train step, with random erasing's fills drawn there.

The host then does only the uint8 work (decode, crop, flip, RandAugment) and hands over
a quarter of the bytes: no float32 normalisation and no normal draws for the erased
boxes per image, and 150 KB instead of 602 KB per 224 px image through grain's worker
processes and to the device (README, Data: "Host throughput"). On the device the
conversion fuses into the first convolution's input, as the float32 one did.

The fills differ from the host's in their random stream, not in their distribution:
'pixel' draws N(0, 1) per pixel and channel from the example's own uint32
``erase_seed`` (drawn from its host generator, so a batch depends only on (seed,
position), as on the host), 'rand' N(0, 1) per box and channel, 'const' zeros. Boxes are
the host's (:func:`qlhs_jax.data.transforms.erasing_boxes`).

'pixel' computes a fill for every pixel of every image (XLA evaluates both sides of the
select), so its generator sets the cost of the step's input kernel. ``erase_noise``:
- "hash" (the default): each value's 32 bits are a counter hash of (seed, pixel,
  channel), :func:`hash_bits`, turned into N(0, 1) as ``jax.random.normal`` turns its
  bits. ~12 integer operations a value.
- "threefry": ``jax.random.normal`` from a key seeded by ``erase_seed`` (the only form
  before 2026-12-05). Threefry-2x32's 20 rounds, recomputed for each value inside the
  fused input kernel: ~130 integer operations a value, which made that kernel
  compute-bound (0.25 ms of an H200 step; benchmarks/NOTES.md, experiment 32).
Both give standard normal fills; they differ in their values.

With ``device_randaugment`` the images arrive before RandAugment, with the ops the host
drew for each, and :func:`qlhs_jax.device_augment.randaugment` applies them first.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qlhs_jax import device_augment

REMODES = ("pixel", "rand", "const")
ERASE_NOISES = ("hash", "threefry")
# Mixed into the seed before it is hashed, so that the seed's and the position's hashes
# are not the same function of small numbers (2**32 / golden ratio, as in many hashes).
_SEED_SALT = 0x9E3779B9


def _lowbias32(x: jax.Array) -> jax.Array:
  """Chris Wellons' "lowbias32" (public domain; https://nullprogram.com/blog/2018/07/31/):
  a bijection of uint32, found by searching xor-shift-multiply hashes for the lowest
  avalanche bias (an input bit's flip should flip each output bit half the time).
  Multiplications wrap modulo 2**32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hash_bits(seed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 ``[B, *shape]``: value i (row-major in ``shape``) of image b is
  ``h(h(i) ^ h(seed[b] ^ salt))``, h = :func:`_lowbias32`.

  For one image it is a bijection of i, so an image's values are distinct 32-bit
  words; two images' words differ by the hash of a fixed XOR of their keys, which the
  hash's avalanche leaves uncorrelated (tests/test_device_input.py measures both)."""
  position = _lowbias32(lax.iota(jnp.uint32, int(np.prod(shape))).reshape(shape))
  key = _lowbias32(seed.astype(jnp.uint32) ^ jnp.uint32(_SEED_SALT))
  return _lowbias32(position[None] ^ key.reshape((-1,) + (1,) * len(shape)))


def bits_to_normal(bits: jax.Array) -> jax.Array:
  """uint32 -> float32 N(0, 1), as ``jax.random.normal`` maps its bits: the top 23 bits
  as a uniform in [0, 1), moved to [nextafter(-1, 0), 1), then sqrt(2) erf^-1."""
  unit = lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1
  lo = np.nextafter(np.float32(-1), np.float32(0))
  uniform = jnp.maximum(lo, unit * (np.float32(1) - lo) + lo)
  return np.float32(np.sqrt(2)) * lax.erf_inv(uniform)


def pixel_noise(seed: jax.Array, shape: tuple[int, ...], generator: str = "hash"):
  """float32 N(0, 1) ``[B, *shape]``, image b's from ``seed[b]`` (uint32) alone."""
  if generator == "hash":
    return bits_to_normal(hash_bits(seed, shape))
  if generator == "threefry":
    keys = jax.vmap(jax.random.key)(seed)
    return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
  raise ValueError(f"erase noise {generator!r}; expected one of {ERASE_NOISES}")


def normalize(image: jax.Array, mean, std) -> jax.Array:
  """uint8 ``[..., 3]`` -> float32 ``x * (1 / (255 std)) - mean / std``: the host's
  :func:`qlhs_jax.data.transforms.normalize`, with the same float32 constants."""
  scale = np.asarray([1.0 / (255.0 * s) for s in std], np.float32)
  offset = np.asarray([m / s for m, s in zip(mean, std)], np.float32)
  return image.astype(jnp.float32) * scale - offset


def normalize_and_erase(image: jax.Array, erase: jax.Array, erase_seed: jax.Array, *,
                        mean, std, mode: str = "pixel",
                        noise: str = "hash") -> jax.Array:
  """Normalises uint8 images ``[B, H, W, C]`` and fills each image's boxes ``erase``
  (int32 ``[B, K, 4]`` rows of top, left, height, width; height 0 = no box) per
  ``mode``; later boxes overwrite earlier ones where they overlap, as on the host.
  ``noise``: the generator of the 'pixel' fills (module docstring)."""
  if mode not in REMODES:
    raise ValueError(f"erasing mode {mode!r}; expected one of {REMODES}")
  if noise not in ERASE_NOISES:
    raise ValueError(f"erase noise {noise!r}; expected one of {ERASE_NOISES}")
  x = normalize(image, mean, std)
  _, h, w, c = x.shape
  top, left, bh, bw = (erase[:, :, i, None, None] for i in range(4))  # [B, K, 1, 1]
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
  if mode == "rand":
    keys = jax.vmap(jax.random.key)(erase_seed)
    colours = jax.vmap(lambda k: jax.random.normal(k, (erase.shape[1], c)))(keys)
    for k in range(erase.shape[1]):
      x = jnp.where(inside[:, k, :, :, None], colours[:, k, None, None, :], x)
    return x
  covered = jnp.any(inside, axis=1)[..., None]  # [B, H, W, 1]
  if mode == "const":
    return jnp.where(covered, 0.0, x)
  return jnp.where(covered, pixel_noise(erase_seed, (h, w, c), noise), x)


def randaugment_fill(mean) -> tuple[int, int, int]:
  """The geometric ops' fill, timm's mean pixel: ``qlhs_jax.data.pipeline``'s."""
  return tuple(min(255, round(255 * m)) for m in mean)


def train_images_fn(data_config) -> Callable[[dict], jax.Array]:
  """``batch -> float32 images`` for the train step: the pipeline's own images where
  the host normalised them (``device_normalize`` False), else (after RandAugment, with
  ``device_randaugment``) :func:`normalize` and, where erasing is on,
  :func:`normalize_and_erase` of the uint8 batch."""
  if not data_config.device_normalize:
    return lambda batch: batch["image"]
  mean, std = tuple(data_config.mean), tuple(data_config.std)
  mode, erasing = data_config.remode, data_config.reprob > 0
  noise = data_config.erase_noise
  augment = data_config.device_randaugment and bool(data_config.randaugment)
  fill = randaugment_fill(mean)

  def images(batch):
    image = batch["image"]
    if image.dtype != jnp.uint8:
      # Normalising a normalised batch again would train on garbage without a sound.
      raise ValueError(
          f"config.data.device_normalize=True expects the pipeline's uint8 train "
          f"images, got {image.dtype}; build the input with the same data config, or "
          "set config.data.device_normalize=False for float32 batches")
    if augment:
      if "ra_op" not in batch:
        raise ValueError(
            "config.data.device_randaugment=True expects the ops the pipeline draws "
            "(ra_op, ra_arg, ra_resample); build the input with the same data config")
      image = device_augment.randaugment(image, batch["ra_op"], batch["ra_arg"],
                                         batch["ra_resample"], fill)
    if not erasing:
      return normalize(image, mean, std)
    return normalize_and_erase(image, batch["erase"], batch["erase_seed"], mean=mean,
                               std=std, mode=mode, noise=noise)
  return images
