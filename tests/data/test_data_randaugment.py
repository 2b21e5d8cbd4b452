"""RandAugment (timm semantics) against hand-computed pixel results and statistics."""

import math

import numpy as np
from PIL import Image
import pytest

from qlhs_jax.data import randaugment as ra

FILL = (124, 116, 104)
# The recipe's "increasing" op set (recipe.md), typed out independently of the code.
RECIPE_OPS = {
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel"}


def random_image(w=24, h=20, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def apply(arr, name, magnitude, seed=0):
  img = ra.apply_op(Image.fromarray(arr), name, magnitude, np.random.default_rng(seed),
                    FILL)
  return np.asarray(img)


def test_parse_recipe_string():
  aug = ra.parse("rand-m7-mstd0.5-inc1", fill=FILL)
  assert set(aug.ops) == RECIPE_OPS and len(aug.ops) == 15
  assert (aug.num_ops, aug.prob, aug.magnitude, aug.magnitude_std,
          aug.magnitude_max) == (2, 0.5, 7.0, 0.5, 10.0)
  assert aug.fill == FILL and aug.resample is None
  assert ra.parse("rand-m9-n3-mstd101-p0.3").magnitude_std == math.inf
  assert "Posterize" in ra.parse("rand-m9").ops  # inc0: the original op set
  assert ra.parse("") is None


@pytest.mark.parametrize("spec", ["rand-q3", "auto-m7", "rand-m", "rand-m7-x"])
def test_parse_rejects_bad_strings(spec):
  with pytest.raises(ValueError):
    ra.parse(spec)


@pytest.mark.parametrize("name", [
    "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing"])
def test_identity_at_magnitude_zero(name):
  arr = random_image()
  for seed in range(4):  # both signs and both resampling filters
    np.testing.assert_array_equal(apply(arr, name, 0.0, seed), arr)


def test_invert_and_solarize_known_pixels():
  arr = np.array([[[0, 100, 127], [128, 200, 255]]], np.uint8)
  np.testing.assert_array_equal(apply(arr, "Invert", 5), 255 - arr)
  # SolarizeIncreasing at 10: threshold 256 - 256 = 0: every pixel inverted.
  np.testing.assert_array_equal(apply(arr, "SolarizeIncreasing", 10), 255 - arr)
  # Solarize (decreasing) at 5: threshold int(5 / 10 * 256) = 128.
  np.testing.assert_array_equal(apply(arr, "Solarize", 5),
                                [[[0, 100, 127], [127, 55, 0]]])
  # SolarizeAdd at 10: add min(128, int(110)) = 110 below 128, clipped at 255.
  np.testing.assert_array_equal(apply(arr, "SolarizeAdd", 10),
                                [[[110, 210, 237], [128, 200, 255]]])


def test_posterize_increasing_known_pixels():
  arr = np.array([[[0b10110111, 0b01011010, 255]]], np.uint8)
  # Magnitude 0 keeps 4 - 0 = 4 bits (timm's increasing variant is not the identity).
  np.testing.assert_array_equal(apply(arr, "PosterizeIncreasing", 0),
                                [[[0b10110000, 0b01010000, 0b11110000]]])
  # Magnitude 5 keeps 4 - int(2) = 2 bits; magnitude 10 keeps none.
  np.testing.assert_array_equal(apply(arr, "PosterizeIncreasing", 5),
                                [[[0b10000000, 0b01000000, 0b11000000]]])
  np.testing.assert_array_equal(apply(arr, "PosterizeIncreasing", 10), np.zeros_like(arr))


def test_autocontrast_stretches_to_full_range():
  arr = np.array([[[50, 50, 50], [125, 125, 125], [200, 200, 200]]], np.uint8)
  out = apply(arr, "AutoContrast", 5)
  np.testing.assert_array_equal(out[0, :, 0], [0, 127, 255])


def test_brightness_increasing_factor():
  # Magnitude 10: factor 1 +- 0.9, i.e. 1.9 or 0.1 (blend with black).
  arr = np.full((4, 4, 3), 100, np.uint8)
  seen = set()
  for seed in range(10):
    seen.add(int(apply(arr, "BrightnessIncreasing", 10, seed)[0, 0, 0]))
  assert seen == {10, 190}


def test_translate_rel_shifts_45_percent_with_mean_fill():
  arr = random_image(w=20, h=6)
  shifts = set()
  for seed in range(10):
    out = apply(arr, "TranslateXRel", 10, seed)  # 0.45 * 20 = 9 px, either way
    if np.array_equal(out[:, :11], arr[:, 9:]):
      assert (out[:, 11:] == FILL).all()
      shifts.add(-9)
    else:
      np.testing.assert_array_equal(out[:, 9:], arr[:, :11])
      assert (out[:, :9] == FILL).all()
      shifts.add(9)
  assert shifts == {-9, 9}


def test_rotate_30_degrees_fills_corners_and_keeps_centre():
  arr = np.zeros((21, 21, 3), np.uint8)
  arr[8:13, 8:13] = 200
  out = apply(arr, "Rotate", 10)
  assert (out[0, 0] == FILL).all() and (out[20, 20] == FILL).all()
  assert (out[10, 10] == 200).all()


def test_shear_moves_rows_by_factor():
  # ShearX at 10: x_in = x + 0.3 * y (or -0.3 y): row 10 shifts by 3 px.
  arr = random_image(w=30, h=12)
  out = apply(arr, "ShearX", 10, seed=0)
  row = out[10].astype(int)
  plus = np.abs(row[:20] - arr[10, 3:23]).max()
  minus = np.abs(row[10:] - arr[10, 7:27]).max()
  assert min(plus, minus) <= 40 < max(plus, minus)  # one sign fits, the other does not


def test_two_ops_each_with_probability_half():
  # One op, applied at most twice, that zeroes the image: unchanged with P = 0.5^2.
  aug = ra.RandAugment(ops=("PosterizeIncreasing",), magnitude=10.0)
  arr = np.full((4, 4, 3), 77, np.uint8)
  unchanged = sum(
      np.asarray(aug(Image.fromarray(arr), np.random.default_rng(s)))[0, 0, 0] == 77
      for s in range(2000))
  assert abs(unchanged / 2000 - 0.25) < 0.03


def test_magnitude_is_normal_and_clipped():
  # SolarizeAdd adds int(m * 11) to a black pixel: read the sampled magnitude back.
  black = Image.fromarray(np.zeros((1, 1, 3), np.uint8))
  aug = ra.parse("rand-m7-mstd0.5-p1.0-n1")
  aug = ra.RandAugment(ops=("SolarizeAdd",), num_ops=1, prob=1.0,
                       magnitude=aug.magnitude, magnitude_std=aug.magnitude_std)
  adds = np.array([np.asarray(aug(black, np.random.default_rng(s)))[0, 0, 0]
                   for s in range(3000)], float)
  # E[int(11 m)] for m ~ N(7, 0.5) is 77 - 0.5; std 11 * 0.5 = 5.5.
  assert abs(adds.mean() - 76.5) < 0.5 and 5.0 < adds.std() < 6.0
  clipped = ra.RandAugment(ops=("SolarizeAdd",), num_ops=1, prob=1.0, magnitude=13.0)
  assert np.asarray(clipped(black, np.random.default_rng(0)))[0, 0, 0] == 110


def test_ops_chosen_with_replacement():
  # Two ops from {Invert, SolarizeAdd}, always applied: Invert twice (P = 1/4 when
  # drawn with replacement, 0 without) gives back the image.
  aug = ra.RandAugment(ops=("Invert", "SolarizeAdd"), num_ops=2, prob=1.0,
                       magnitude=10.0)
  arr = np.full((2, 2, 3), 60, np.uint8)
  same = sum(np.array_equal(np.asarray(aug(Image.fromarray(arr),
                                           np.random.default_rng(s))), arr)
             for s in range(2000))
  assert abs(same / 2000 - 0.25) < 0.03
