"""``device_normalize``: uint8 train batches, normalised and erased on the device,
against the host's float32 path and NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlhs_jax import data
from qlhs_jax import device_input as D
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


def test_pixel_fills_are_standard_normal_and_follow_the_seed():
  img, boxes, seeds = _batch(1, b=64, h=32, w=32)
  f = jax.jit(lambda i, b, s: D.normalize_and_erase(i, b, s, mean=MEAN, std=STD))
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
