"""``device_normalize``: uint8 train batches, normalised and erased on the device,
against the host's float32 path and NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlhs_jax import data
from qlhs_jax import device_input as D
from qlhs_jax.data import config as data_config
from qlhs_jax.data import transforms as T

MEAN, STD = T.IMAGENET_MEAN, T.IMAGENET_STD


def digits(**kw):
  c = data.digits_config(image_size=24)
  for k, v in kw.items():
    c[k] = v
  return c


def boxes_mask(boxes, h, w):
  """float64 NumPy: where any of ``boxes`` (rows top, left, height, width) lies."""
  mask = np.zeros((h, w), bool)
  for top, left, bh, bw in boxes:
    mask[top:top + bh, left:left + bw] = True
  return mask


def test_normalize_matches_the_hosts_float64_values():
  img = np.random.default_rng(0).integers(0, 256, (2, 9, 7, 3), dtype=np.uint8)
  ref = (img / 255.0 - np.asarray(MEAN)) / np.asarray(STD)  # float64
  out = np.asarray(jax.jit(lambda x: D.normalize(x, MEAN, STD))(img))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, ref, rtol=0, atol=3e-6)
  for i in range(2):
    np.testing.assert_allclose(out[i], T.normalize(img[i], MEAN, STD), rtol=0, atol=1e-6)


def test_erasing_boxes_are_the_hosts():
  """The host's loop and the box list draw alike up to the first fill: with 'const'
  (no fills) every box is the host's, with 'pixel' the first."""
  h, w = 30, 40
  hits = 0
  for s in range(1500):
    out = T.random_erasing(np.ones((h, w, 3), np.float32), np.random.default_rng(s),
                           prob=0.4, mode="const", max_count=3)
    boxes = T.erasing_boxes(np.random.default_rng(s), h, w, prob=0.4, max_count=3)
    assert boxes.shape == (3, 4) and boxes.dtype == np.int32
    host = out[..., 0] == 0
    dev = boxes_mask(boxes, h, w)
    # 'const' draws no fills, so here every box is the host's.
    np.testing.assert_array_equal(dev, host)
    used = boxes[:, 2] > 0
    assert (used == (np.arange(3) < used.sum())).all()  # used rows first
    hits += dev.any()
  assert abs(hits / 1500 - 0.4) < 0.04
  # 'pixel' draws fills between boxes: only the first box stays the host's.
  rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
  out = T.random_erasing(np.full((h, w, 3), 9.0, np.float32), rng_a, prob=1.0,
                         mode="pixel", min_count=1, max_count=1)
  box = T.erasing_boxes(rng_b, h, w, prob=1.0, max_count=1)[0]
  np.testing.assert_array_equal(out[..., 0] != 9.0, boxes_mask([box], h, w))


def _batch(seed=0, b=6, h=20, w=24, k=3):
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
  boxes = np.stack([T.erasing_boxes(rng, h, w, prob=0.8, max_count=k)
                    for _ in range(b)])
  seeds = rng.integers(0, 2**32, b, dtype=np.uint32)
  return img, boxes, seeds


def test_const_and_rand_fills_against_numpy():
  img, boxes, seeds = _batch()
  assert (boxes[:, 1, 2] > 0).any()  # some images have overlapping candidates
  ref = T.normalize(img, MEAN, STD)
  const = np.asarray(D.normalize_and_erase(img, boxes, seeds, mean=MEAN, std=STD,
                                           mode="const"))
  rand = np.asarray(D.normalize_and_erase(img, boxes, seeds, mean=MEAN, std=STD,
                                          mode="rand"))
  for i in range(len(img)):
    want = ref[i].copy()
    for top, left, bh, bw in boxes[i]:
      want[top:top + bh, left:left + bw] = 0.0
    np.testing.assert_allclose(const[i], want, rtol=0, atol=1e-6)
    # 'rand': one colour per box and channel; a later box overwrites an earlier one.
    owner = np.full(img.shape[1:3], -1)
    for k, (top, left, bh, bw) in enumerate(boxes[i]):
      owner[top:top + bh, left:left + bw] = k
    np.testing.assert_allclose(rand[i][owner < 0], ref[i][owner < 0], rtol=0, atol=1e-6)
    for k in set(owner.ravel()) - {-1}:
      colours = rand[i][owner == k]
      assert (colours == colours[0]).all() and not np.allclose(colours[0], 0)


@pytest.mark.parametrize("noise", D.ERASE_NOISES)
def test_pixel_fills_are_standard_normal_and_follow_the_seed(noise):
  img, boxes, seeds = _batch(1, b=64, h=32, w=32)
  f = jax.jit(lambda i, b, s: D.normalize_and_erase(i, b, s, mean=MEAN, std=STD,
                                                    noise=noise))
  out = np.asarray(f(img, boxes, seeds))
  ref = T.normalize(img, MEAN, STD)
  mask = np.stack([boxes_mask(bx, 32, 32) for bx in boxes])
  assert mask.sum() > 5000
  np.testing.assert_allclose(out[~mask], ref[~mask], rtol=0, atol=1e-6)
  fills = out[mask].ravel()
  assert abs(fills.mean()) < 0.03 and abs(fills.std() - 1) < 0.03
  # The fills are not the image: their correlation with it is ~0.
  assert abs(np.corrcoef(fills, ref[mask].ravel())[0, 1]) < 0.05
  np.testing.assert_array_equal(out, np.asarray(f(img, boxes, seeds)))  # deterministic
  other = np.asarray(f(img, boxes, seeds + 1))
  assert (other[mask] != out[mask]).mean() > 0.99
  np.testing.assert_array_equal(other[~mask], out[~mask])
  # An image's fills depend on its own seed only, not on its neighbours.
  half = np.asarray(f(img[:8], boxes[:8], seeds[:8]))
  np.testing.assert_array_equal(half, out[:8])


def numpy_lowbias32(x):
  """NumPy uint64 arithmetic masked to 32 bits, apart from the code under test."""
  x = np.asarray(x, np.uint64) & 0xFFFFFFFF
  x ^= x >> 16
  x = (x * 0x7FEB352D) & 0xFFFFFFFF
  x ^= x >> 15
  x = (x * 0x846CA68B) & 0xFFFFFFFF
  return x ^ (x >> 16)


def test_lowbias32_is_the_published_hash():
  """Values of Wellons' lowbias32 from its definition, worked by hand for 1:
  1 -> 1 ^ 0 = 1 -> 0x7feb352d -> ^ (>> 15) = 0x7feb352d ^ 0xffd6 = 0x7febcafb ->
  * 0x846ca68b mod 2**32 -> ^ (>> 16)."""
  x = 0x7FEB352D ^ (0x7FEB352D >> 15)
  assert x == 0x7FEBCAFB
  x = (x * 0x846CA68B) % 2**32
  want_1 = x ^ (x >> 16)
  got = np.asarray(D._lowbias32(jnp.asarray([0, 1, 2**32 - 1], jnp.uint32)))
  assert got[0] == 0 and got[1] == want_1
  assert got[2] == numpy_lowbias32(2**32 - 1)


def test_hash_fills_against_numpy_float64():
  """Bits exactly, and the normals against SciPy's float64 erfinv of the same uniforms."""
  from scipy import special
  seeds = np.asarray([0, 1, 2**32 - 1, 123456789], np.uint32)
  shape = (5, 7, 3)
  bits = np.asarray(jax.jit(D.hash_bits, static_argnums=1)(seeds, shape))
  i = np.arange(np.prod(shape)).reshape(shape)
  key = numpy_lowbias32(seeds.astype(np.uint64) ^ 0x9E3779B9)
  want = numpy_lowbias32(numpy_lowbias32(i)[None] ^ key[:, None, None, None])
  np.testing.assert_array_equal(bits, want)
  normal = np.asarray(jax.jit(D.bits_to_normal)(jnp.asarray(bits)))
  lo = np.nextafter(np.float32(-1), np.float32(0)).astype(np.float64)
  uniform = np.maximum(lo, (want >> 9) / 2.0**23 * (1 - lo) + lo)
  np.testing.assert_allclose(normal, np.sqrt(2) * special.erfinv(uniform),
                             rtol=5e-5, atol=2e-6)  # float32 erf^-1: 1.7e-5 in a tail
  # The extremes, finite: the smallest word gives -5.42; the largest 5.22 where exact
  # arithmetic gives 5.17 (u = 1 - 2.4e-7 rounds in float32, as in jax.random.normal).
  ends = np.asarray(D.bits_to_normal(jnp.asarray([0, 2**32 - 1], jnp.uint32)))
  want = np.sqrt(2) * special.erfinv([lo, 1 - 2.0**-23 * (1 - lo)])
  np.testing.assert_allclose(ends[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(ends[1], want[1], rtol=0.02)


def test_hash_fills_are_independent_standard_normals():
  """64 images of 32x32x3 from consecutive seeds (the hardest case for a hash): the
  values' distribution against N(0, 1), and the correlation of every neighbour a
  fill's structure could tie (across a row, a column, a channel, the next image and
  the next seed at the same place) at the level of chance (n = 196,608: sd 0.0023)."""
  from scipy import stats
  seeds = np.arange(1000, 1064, dtype=np.uint32)
  z = np.asarray(jax.jit(D.pixel_noise, static_argnums=1)(seeds, (32, 32, 3)),
                 np.float64)
  flat = z.ravel()
  assert stats.kstest(flat, "norm").pvalue > 1e-3
  assert abs(flat.mean()) < 0.01 and abs(flat.var() - 1) < 0.015
  assert abs(stats.skew(flat)) < 0.03 and abs(stats.kurtosis(flat)) < 0.06
  pairs = {"row": (z[:, :, :-1], z[:, :, 1:]), "column": (z[:, :-1], z[:, 1:]),
           "channel": (z[..., :-1], z[..., 1:]), "image": (z[:-1], z[1:]),
           "diagonal": (z[:, :-1, :-1], z[:, 1:, 1:])}
  for name, (a, b) in pairs.items():
    r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert abs(r) < 0.012, (name, r)
  # The bits as well: each of the 32 is set half the time (sd 0.0011).
  bits = np.asarray(D.hash_bits(seeds, (32, 32, 3))).reshape(64, -1)
  ones = ((bits.ravel()[:, None] >> np.arange(32, dtype=np.uint32)) & 1).mean(axis=0)
  assert np.abs(ones - 0.5).max() < 0.006
  # And an image's words are distinct (the hash of a position is a bijection).
  assert all(len(np.unique(row)) == row.size for row in bits)


def test_erase_noise_is_a_data_config_key():
  c = data.default_config()
  assert c.erase_noise == "hash" and D.ERASE_NOISES == ("hash", "threefry")
  c.erase_noise = "philox"
  with pytest.raises(ValueError, match=r"config.data.erase_noise='philox'; expected one "
                                       r"of \('hash', 'threefry'\)"):
    data_config.validate(c)
  with pytest.raises(ValueError, match="erase noise 'philox'; expected one of"):
    D.normalize_and_erase(jnp.zeros((1, 2, 2, 3), jnp.uint8), jnp.zeros((1, 1, 4), int),
                          jnp.zeros((1,), jnp.uint32), mean=MEAN, std=STD, noise="philox")


@pytest.mark.parametrize("noise", D.ERASE_NOISES)
def test_the_config_key_picks_the_generator(noise):
  img, boxes, seeds = _batch(2, b=4, h=16, w=16)
  batch = {"image": img, "erase": boxes, "erase_seed": seeds}
  c = data.default_config()
  c.device_normalize, c.erase_noise, c.randaugment = True, noise, ""
  got = np.asarray(jax.jit(D.train_images_fn(c))(batch))
  erase = jax.jit(D.normalize_and_erase, static_argnames=("mean", "std", "noise"))
  want = np.asarray(erase(img, boxes, seeds, mean=MEAN, std=STD, noise=noise))
  np.testing.assert_array_equal(got, want)
  other = "threefry" if noise == "hash" else "hash"
  mask = np.stack([boxes_mask(bx, 16, 16) for bx in boxes])
  assert mask.any()
  assert not np.array_equal(got[mask], np.asarray(
      erase(img, boxes, seeds, mean=MEAN, std=STD, noise=other))[mask])


@pytest.mark.parametrize("reprob,remode", [(0.0, "pixel"), (1.0, "const")])
def test_pipeline_batches_equal_the_hosts(reprob, remode):
  """With no fills drawn ('const' or no erasing), the device path gives the host's
  float32 batches: same crops, same boxes, same values."""
  kw = dict(reprob=reprob, remode=remode, recount=3, rrc_scale=(0.2, 1.0), hflip=0.5)
  host = next(data.build_input(digits(**kw), split="train", global_batch_size=16,
                               seed=4).iterator())
  dev_config = digits(device_normalize=True, **kw)
  dev_in = data.build_input(dev_config, split="train", global_batch_size=16, seed=4)
  dev = next(dev_in.iterator())
  assert dev["image"].dtype == np.uint8 and dev["image"].shape == (16, 24, 24, 3)
  assert ("erase" in dev) == (reprob > 0)
  if reprob:
    assert dev["erase"].shape == (16, 3, 4) and dev["erase_seed"].dtype == np.uint32
  np.testing.assert_array_equal(dev["label"], host["label"])
  images = jax.jit(D.train_images_fn(dev_config))(dev)
  np.testing.assert_allclose(np.asarray(images), host["image"], rtol=0, atol=1e-6)
  # Validation batches stay float32.
  val = next(data.build_input(digits(device_normalize=True), split="validation",
                              global_batch_size=16, seed=0).iterator())
  assert val["image"].dtype == np.float32


def test_host_normalize_is_the_identity_and_floats_are_refused():
  batch = {"image": np.zeros((2, 4, 4, 3), np.float32)}
  assert D.train_images_fn(digits())(batch) is batch["image"]
  with pytest.raises(ValueError, match="device_normalize=True expects the pipeline's "
                                       "uint8 train images, got float32"):
    D.train_images_fn(digits(device_normalize=True))(batch)
  with pytest.raises(ValueError, match="erasing mode 'noise'"):
    D.normalize_and_erase(jnp.zeros((1, 2, 2, 3), jnp.uint8), jnp.zeros((1, 1, 4), int),
                          jnp.zeros((1,), jnp.uint32), mean=MEAN, std=STD, mode="noise")
