"""Transforms against expectations computed by hand or with plain Pillow/NumPy."""

import io

import numpy as np
from PIL import Image
import pytest

from qlhs_jax.data import transforms as T

MEAN = np.asarray((0.485, 0.456, 0.406), np.float32)
STD = np.asarray((0.229, 0.224, 0.225), np.float32)


def coord_image(width, height):
  """R = x mod 256, G = x // 256 * 64 + y // 256 ..., B = y mod 256: every pixel
  tells where it came from."""
  y, x = np.mgrid[0:height, 0:width]
  return np.stack([x % 256, (x // 256) * 16 + y // 256, y % 256], -1).astype(np.uint8)


def smooth_image(width, height, seed=0):
  rng = np.random.default_rng(seed)
  small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
  return np.asarray(small.resize((width, height), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("w,h,size,crop_pct,expected", [
    # 224 / 0.875 = 256; 256 * 500 / 375 = 341.3 -> 341; (341 - 224) / 2 = 58.5 -> 58
    # (round half to even, as torchvision's int(round(.))); (256 - 224) / 2 = 16.
    (500, 375, 224, 0.875, ((341, 256), (58, 16, 282, 240))),
    (375, 500, 224, 0.875, ((256, 341), (16, 58, 240, 282))),
    # floor(224 / 0.95) = 235; int(235 * 500 / 375) = 313; 44.5 -> 44; 5.5 -> 6.
    (500, 375, 224, 0.95, ((313, 235), (44, 6, 268, 230))),
    # Square image, crop_pct 1: resize to the crop size, no crop.
    (8, 8, 32, 1.0, ((32, 32), (0, 0, 32, 32))),
])
def test_eval_geometry_by_hand(w, h, size, crop_pct, expected):
  assert T.eval_geometry(w, h, size, crop_pct) == expected


def test_eval_crop_is_exact_when_no_resize_is_needed():
  # Short side 256 = floor(224 / 0.875): no resize, so the crop is pixel exact:
  # left = round((300 - 224) / 2) = 38, top = 16.
  img = coord_image(300, 256)
  out = np.asarray(T.EvalTransform(224, 0.875).crop(img))
  assert out.shape == (224, 224, 3)
  np.testing.assert_array_equal(out, img[16:240, 38:262])


def test_eval_crop_equals_resize_then_crop():
  img = smooth_image(500, 375)
  ref = np.asarray(Image.fromarray(img).resize((341, 256), Image.Resampling.BICUBIC))
  ref = ref[16:240, 58:282].astype(int)
  out = np.asarray(T.EvalTransform(224, 0.875).crop(img)).astype(int)
  # Equal up to the rounding of Pillow's 8-bit intermediate pass (a shift of the crop
  # by one pixel would differ by ~5 levels on average).
  diff = np.abs(out - ref)
  assert diff.max() <= 2 and diff.mean() < 0.01


def test_eval_transform_output_and_jpeg_input():
  img = smooth_image(320, 240)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=95)
  out = T.EvalTransform(64, 0.875)(buf.getvalue())
  assert out.shape == (64, 64, 3) and out.dtype == np.float32
  lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
  assert np.all(out >= lo - 1e-5) and np.all(out <= hi + 1e-5)


def test_normalize_known_values():
  img = np.array([[[0, 0, 0], [255, 255, 255], [124, 116, 104]]], np.uint8)
  out = T.normalize(img)
  np.testing.assert_allclose(out[0, 0], -MEAN / STD, rtol=1e-6)
  np.testing.assert_allclose(out[0, 1], (1 - MEAN) / STD, rtol=1e-6)
  np.testing.assert_allclose(out[0, 2], (np.array([124, 116, 104]) / 255 - MEAN) / STD,
                             rtol=1e-5, atol=1e-6)


def test_rrc_whole_image_when_scale_and_ratio_pin_it():
  rng = np.random.default_rng(0)
  for _ in range(5):
    assert T.rrc_params(rng, 400, 300, scale=(1, 1), ratio=(4 / 3, 4 / 3)) == (
        0, 0, 400, 300)


def test_rrc_falls_back_to_centre_crop():
  # 100x10 cannot hold any box of >= 90% area with aspect <= 4/3: the fallback is the
  # centre crop of aspect 4/3: w = round(10 * 4 / 3) = 13, left = (100 - 13) // 2.
  rng = np.random.default_rng(0)
  assert T.rrc_params(rng, 100, 10, scale=(0.9, 1.0)) == (43, 0, 13, 10)


def test_rrc_boxes_respect_scale_ratio_and_bounds():
  rng = np.random.default_rng(1)
  w_img, h_img = 400, 400  # square, so that rejections do not favour either aspect
  areas, aspects = [], []
  for _ in range(2000):
    left, top, w, h = T.rrc_params(rng, w_img, h_img)
    assert 0 <= left and left + w <= w_img and 0 <= top and top + h <= h_img
    areas.append(w * h / (w_img * h_img))
    aspects.append(w / h)
  areas, aspects = np.array(areas), np.array(aspects)
  assert areas.min() >= 0.08 * 0.97 and areas.max() <= 1.0
  assert aspects.min() >= 0.75 * 0.97 and aspects.max() <= 4 / 3 * 1.03
  # Area ~ U(0.08, 1) before rejection; rejections only remove large boxes.
  assert 0.3 < np.median(areas) < 0.55
  # log-uniform on [log 3/4, log 4/3]: mean 0, std 0.166 (3 sigma of the mean: 0.011).
  assert abs(np.mean(np.log(aspects))) < 0.015


def identity_train(**kw):
  """A train transform whose crop is the whole image at its own size."""
  args = dict(size=32, scale=(1, 1), ratio=(1, 1), hflip=0.0)
  args.update(kw)
  return T.TrainTransform(**args)


def test_train_identity_crop_and_known_flip():
  img = coord_image(32, 32)
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(np.asarray(identity_train().augment(img, rng)), img)
  flipped = np.asarray(identity_train(hflip=1.0).augment(img, rng))
  assert flipped[5, 0, 0] == 31 and flipped[5, 31, 0] == 0  # x -> 31 - x
  np.testing.assert_array_equal(flipped, img[:, ::-1])


def test_flip_probability():
  img = coord_image(16, 16)
  t = identity_train(size=16, hflip=0.5)
  flips = sum(np.asarray(t.augment(img, np.random.default_rng(s)))[0, 0, 0] == 15
              for s in range(1000))
  assert 430 < flips < 570


def test_train_transform_full_recipe_shapes_and_determinism():
  from qlhs_jax.data import randaugment as ra
  img = smooth_image(500, 375)
  t = T.TrainTransform(size=64, randaugment=ra.parse("rand-m7-mstd0.5-inc1"),
                       reprob=0.4, recount=3)
  a = t(img, np.random.default_rng([2, 0, 0, 7]))
  b = t(img, np.random.default_rng([2, 0, 0, 7]))
  c = t(img, np.random.default_rng([2, 0, 1, 7]))
  assert a.shape == (64, 64, 3) and a.dtype == np.float32 and np.isfinite(a).all()
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_jpeg_draft_decodes_smaller_and_keeps_the_picture():
  img = smooth_image(1024, 768)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=95)
  lazy = T.open_image(buf.getvalue())
  assert T.jpeg_draft(lazy, (256, 192)) == 4.0 and lazy.size == (256, 192)
  full = T.EvalTransform(64, 1.0)(buf.getvalue())
  draft = T.EvalTransform(64, 1.0, jpeg_draft=True)(buf.getvalue())
  assert np.abs(full - draft).mean() < 0.05  # ~3 grey levels of a smooth picture.


def test_random_erasing_probability_zero_and_one():
  base = np.ones((40, 50, 3), np.float32) * 7
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(T.random_erasing(base.copy(), rng, prob=0.0), base)
  for s in range(50):
    out = T.random_erasing(base.copy(), np.random.default_rng(s), prob=1.0,
                           mode="const", min_count=1, max_count=1)
    erased = out[..., 0] == 0
    rows, cols = np.flatnonzero(erased.any(1)), np.flatnonzero(erased.any(0))
    # One axis-aligned box covering 2% .. 1/3 of the image (up to rounding).
    assert erased.sum() == len(rows) * len(cols)
    assert 0.015 <= erased.mean() <= 0.36
    assert (out[erased] == 0).all() and (out[~erased] == 7).all()


def test_random_erasing_statistics():
  base = np.full((32, 32, 3), 100.0, np.float32)
  hits, fills, fractions = 0, [], []
  for s in range(2000):
    out = T.random_erasing(base.copy(), np.random.default_rng(s), prob=0.4,
                           mode="pixel", max_count=3)
    erased = out != 100.0
    if erased.any():
      hits += 1
      fills.append(out[erased])
      fractions.append(erased[..., 0].mean())
  assert abs(hits / 2000 - 0.4) < 0.035  # 3 sigma of a binomial(2000, 0.4)
  fills = np.concatenate(fills)
  assert abs(fills.mean()) < 0.02 and abs(fills.std() - 1) < 0.02  # N(0, 1) per pixel
  assert max(fractions) <= 0.5  # each box <= 1/3 / count: together at most ~1/3


def test_unreadable_image_raises_invalid_data():
  from qlhs_jax.data.errors import InvalidDataError
  with pytest.raises(InvalidDataError, match="Cannot read image"):
    T.EvalTransform(32)(b"not a jpeg")
  good = io.BytesIO()
  noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
  Image.fromarray(noise).save(good, format="JPEG")
  with pytest.raises(InvalidDataError, match="Cannot decode image"):
    T.EvalTransform(32)(good.getvalue()[:len(good.getvalue()) // 2])  # truncated
