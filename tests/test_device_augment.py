"""``device_randaugment``: RandAugment's ops drawn on the host and applied in the train
step, against Pillow (timm's RandAugment, ``qlhs_jax.data.randaugment``) itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from qlhs_jax import data
from qlhs_jax import device_augment as DA
from qlhs_jax import device_input as D
from qlhs_jax.data import config as data_config
from qlhs_jax.data import pipeline
from qlhs_jax.data import randaugment as ra
from qlhs_jax.benchmarks import augment

FILL = augment.FILL
RECIPE = "rand-m9-mstd0.5-inc1"  # the recipe's spec at a higher magnitude
IMAGES = augment.test_images()
_apply = jax.jit(DA.apply_op, static_argnums=4)
# Pillow's arithmetic done the same way: exact. AutoContrast: Pillow truncates a
# float64 quotient the device forms exactly. Geometric: Pillow's coordinates are
# float64, the device's float32, and the filters truncate, so a value that is an
# integer in exact arithmetic lands on either side (most often under a translation,
# whose fraction is the same for every pixel).
TOLERATED_FRACTION = {"AutoContrast": 1e-3, **{n: 0.15 for n in ra.GEOMETRIC}}


@pytest.mark.parametrize("name", list(augment.ARGS))
def test_each_op_matches_pillow(name):
  worst, fraction = augment.op_differences(IMAGES, name)
  assert worst <= (1 if name in TOLERATED_FRACTION else 0), (name, worst)
  assert fraction <= TOLERATED_FRACTION.get(name, 0.0), (name, fraction)


@pytest.mark.parametrize("resample", [Image.BILINEAR, Image.BICUBIC])
@pytest.mark.parametrize("shift", [0.5, -0.5, 1.0])
def test_affine_edges_as_pillow(shift, resample):
  """A half-pixel shift puts the sample points of the last row and column exactly on
  the image's far edge (Pillow fills there: x >= W is outside) and those of the first
  on its near edge (inside); a whole one moves them past it. Exact coordinates, so the
  device must equal Pillow everywhere."""
  img = IMAGES[1][:9, :13]
  matrix = (1.0, 0.0, shift, 0.0, 1.0, shift)
  ours = jax.jit(DA._affine)(jnp.asarray(img), jnp.asarray(matrix, jnp.float32),
                             resample == Image.BICUBIC, FILL)
  theirs = Image.fromarray(img).transform((13, 9), Image.AFFINE, matrix, resample,
                                          fillcolor=FILL)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  filled = np.all(np.asarray(ours) == FILL, -1)
  assert not filled[:-1, :-1].any()
  assert filled[-1].all() == filled[:, -1].all() == (shift > 0)
  assert filled.any() == (shift > 0)


def test_skipped_slot_and_increasing_ops_share_codes():
  img = jnp.asarray(IMAGES[0])
  np.testing.assert_array_equal(_apply(img, DA.SKIPPED, 3.0, 1, FILL), img)
  assert DA.op_code("ColorIncreasing") == DA.op_code("Color") == DA.OPS.index("Color")
  # The host's codes are the device's (a twin: the host's workers do not import jax).
  assert ra.DEVICE_OPS == DA.OPS
  assert tuple(r.name.lower() for r in ra.DEVICE_RESAMPLES) == DA.RESAMPLES


def _timm_loop(aug, img, rng):
  """The host's RandAugment before draw() existed: timm's loop, one apply_op per op."""
  for k in rng.choice(len(aug.ops), aug.num_ops, replace=True):
    if aug.prob < 1.0 and rng.random() > aug.prob:
      continue
    m = min(max(0.0, rng.normal(aug.magnitude, aug.magnitude_std)), aug.magnitude_max)
    img = ra.apply_op(img, aug.ops[k], m, rng, aug.fill, aug.resample)
  return img


@pytest.mark.parametrize("spec", [RECIPE, "rand-m7-mstd0.5", "rand-n3-m10-mstd1-p0.9"])
def test_draw_then_apply_is_timms_loop(spec):
  """Drawing first leaves the host's images and the generator's state as they were."""
  aug = ra.parse(spec, fill=FILL)
  img = Image.fromarray(IMAGES[0])
  for seed in range(60):
    a, b = np.random.default_rng(seed), np.random.default_rng(seed)
    np.testing.assert_array_equal(np.asarray(aug(img, a)),
                                  np.asarray(_timm_loop(aug, img, b)))
    assert a.random() == b.random()


def test_device_arrays():
  drawn = [ra.DrawnOp("SharpnessIncreasing", 1.3, None), None,
           ra.DrawnOp("Rotate", -4.5, Image.Resampling.BICUBIC),
           ra.DrawnOp("Equalize", None, None)]
  arrays = ra.device_arrays(drawn)
  np.testing.assert_array_equal(arrays["ra_op"], [9, -1, 10, 1])
  np.testing.assert_allclose(arrays["ra_arg"], [1.3, 0.0, -4.5, 0.0], rtol=1e-7)
  np.testing.assert_array_equal(arrays["ra_resample"], [0, 0, 1, 0])
  assert arrays["ra_op"].dtype == arrays["ra_resample"].dtype == np.int32
  with pytest.raises(ValueError, match="bilinear or bicubic, not NEAREST"):
    ra.device_arrays([ra.DrawnOp("ShearX", 0.1, Image.Resampling.NEAREST)])


def test_device_examples_draw_as_the_host_and_augment_alike():
  """Same crops, ops, boxes and seeds from the same generator (else it raises); the
  device's images are the host's but for a few values off by one (or more, where a
  later op such as Posterize moves an off-by-one across a step)."""
  diff, applied = augment.example_differences(48, 96, RECIPE)
  assert applied > 0.3  # Half the slots apply an op.
  assert (diff > 0).mean() < 1e-3 and (diff > 1).mean() < 1e-4, diff.max()


def _digits(**kw):
  c = data.digits_config(image_size=24)
  c.randaugment = RECIPE
  for k, v in kw.items():
    c[k] = v
  return c


def test_pipeline_batches_match_the_hosts():
  kw = dict(device_normalize=True, reprob=1.0, remode="const", recount=2)
  host_config, dev_config = _digits(**kw), _digits(device_randaugment=True, **kw)
  host = next(data.build_input(host_config, split="train", global_batch_size=32,
                               seed=3).iterator())
  dev = next(data.build_input(dev_config, split="train", global_batch_size=32,
                              seed=3).iterator())
  assert dev["ra_op"].shape == dev["ra_arg"].shape == dev["ra_resample"].shape == (32, 2)
  assert "ra_op" not in host
  np.testing.assert_array_equal(dev["erase"], host["erase"])
  want = np.asarray(jax.jit(D.train_images_fn(host_config))(host))
  got = np.asarray(jax.jit(D.train_images_fn(dev_config))(dev))
  assert np.mean(np.abs(got - want) > 1e-6) < 2e-3
  # The fill is the pipeline's (timm's mean pixel).
  assert pipeline.make_transform(dev_config, True).randaugment.fill == \
      D.randaugment_fill(dev_config.mean) == FILL


def test_refusals():
  with pytest.raises(ValueError, match="device_randaugment=True needs "
                                       "config.data.device_normalize=True"):
    data_config.validate(_digits(device_randaugment=True))
  with pytest.raises(ValueError, match="resamples bilinear or bicubic, not "
                                       "config.data.train_interpolation='nearest'"):
    data_config.validate(_digits(device_normalize=True, device_randaugment=True,
                          train_interpolation="nearest"))
  batch = {"image": np.zeros((2, 8, 8, 3), np.uint8)}
  with pytest.raises(ValueError, match="expects the ops the pipeline draws"):
    D.train_images_fn(_digits(device_normalize=True, device_randaugment=True))(batch)
  # Without RandAugment there is nothing to apply, and no ops are expected.
  no_ra = _digits(device_normalize=True, device_randaugment=True, randaugment="")
  assert D.train_images_fn(no_ra)(batch).shape == (2, 8, 8, 3)
