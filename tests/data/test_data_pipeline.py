"""The grain pipeline: batching, sharding over processes, epochs, workers, config
checks, bad images, and the iterator state in an orbax checkpoint."""

import collections
import os

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_testutil import deadline, make_folder
from qlhs_jax import data
from qlhs_jax.data import sources


def digits(image_size=16, **kw):
  config = data.digits_config(image_size)
  for k, v in kw.items():
    config[k] = v
  return config


def full_augmentation(**kw):
  """Digits with every train augmentation of the recipe switched on."""
  return digits(hflip=0.5, randaugment="rand-m7-mstd0.5-inc1", reprob=0.4,
                rrc_scale=(0.08, 1.0), **kw)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_default_config_follows_the_recipe():
  c = data.default_config()
  assert (c.name, c.image_size, c.crop_pct, c.eval_interpolation) == (
      "imagenet2012", 224, 0.875, "bicubic")
  assert tuple(c.rrc_scale) == (0.08, 1.0)
  assert tuple(c.rrc_ratio) == pytest.approx((3 / 4, 4 / 3))
  assert (c.hflip, c.randaugment, c.reprob, c.remode, c.recount) == (
      0.5, "rand-m7-mstd0.5-inc1", 0.4, "pixel", 3)
  assert c.train_interpolation == "random" and c.wnids is None
  with pytest.raises(AttributeError):
    c.hflp = 0.0  # locked: a misspelled key cannot be added


def test_config_errors_are_clear():
  base = data.digits_config().to_dict()
  with pytest.raises(ValueError, match="'hflp'.*did you mean 'hflip'"):
    data.build_input(ml_collections.ConfigDict(dict(base, hflp=0.0)),
                     split="train", global_batch_size=8, seed=0)
  for key, value, match in [("name", "imagenet", "imagenet2012"),
                            ("randaugment", "rand-m7-q2", "q"),
                            ("train_interpolation", "cubic", "Unknown interpolation"),
                            ("rrc_scale", (0.5, 0.1), "rrc_scale"),
                            ("remode", "noise", "remode")]:
    config = ml_collections.ConfigDict(dict(base, **{key: value}))
    with pytest.raises(ValueError, match=match):
      data.build_input(config, split="train", global_batch_size=8, seed=0)
  config = data.digits_config()
  for kwargs, match in [(dict(split="test"), "split"),
                        (dict(global_batch_size=10, process_count=3), "multiple"),
                        (dict(global_batch_size=4096), "exceeds"),
                        (dict(seed=-1), "seed"),
                        (dict(process_index=2, process_count=2), "process_index")]:
    args = dict(split="train", global_batch_size=8, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
      data.build_input(config, **args)


def test_train_batches_shapes_and_epoch():
  inp = data.build_input(digits(), split="train", global_batch_size=64, seed=0)
  assert (inp.num_examples, inp.num_classes, inp.image_shape) == (1437, 10, (16, 16, 3))
  assert inp.steps_per_epoch == 1437 // 64 and inp.class_names == tuple("0123456789")
  batch = next(inp.iterator())
  assert batch.keys() == {"image", "label"}
  assert batch["image"].shape == (64, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
  assert 0 <= batch["label"].min() and batch["label"].max() <= 9
  # Normalised with the ImageNet statistics: black background -> -mean/std.
  assert batch["image"].min() == pytest.approx(-0.485 / 0.229, abs=1e-4)


def test_epoch_visits_examples_once_and_reshuffles():
  # Whole-image crops at the source size with no other augmentation: each train image
  # is its record, normalised, so an epoch can be matched against the source.
  config = digits(image_size=8, rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0))
  inp = data.build_input(config, split="train", global_batch_size=100, seed=5)
  src = sources.DigitsSource("train")
  key = lambda img, label: (np.round(img, 3).tobytes(), int(label))
  norm = lambda i: (src.read(i) / 255.0 - data.IMAGENET_MEAN) / data.IMAGENET_STD
  pool = collections.Counter(key(norm(i).astype(np.float32), src.labels[i])
                             for i in range(len(src)))
  it = inp.iterator()
  epochs = []
  for _ in range(2):
    seen = collections.Counter()
    order = []
    for batch in take(it, inp.steps_per_epoch):
      for img, label in zip(batch["image"], batch["label"]):
        seen[key(img, label)] += 1
        order.append(key(img, label))
    assert sum(seen.values()) == 1400  # 14 steps of 100; 37 dropped each epoch
    assert not seen - pool  # each example at most as often as it is in the dataset
    epochs.append(order)
  assert epochs[0] != epochs[1]  # reshuffled


def test_validation_one_padded_pass_in_order():
  inp = data.build_input(digits(), split="validation", global_batch_size=64, seed=0)
  assert inp.steps_per_epoch == 6  # ceil(360 / 64)
  batches = list(inp.iterator())
  assert len(batches) == 6
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert mask.dtype == np.bool_ and mask.sum() == 360 and mask[:360].all()
  np.testing.assert_array_equal(labels[:360], sources.DigitsSource("validation").labels)
  assert (labels[360:] == 0).all() and (batches[-1]["image"][mask[320:].sum():] == 0).all()


@pytest.mark.parametrize("split", ["train", "validation"])
def test_processes_take_contiguous_slices_of_the_global_batch(split):
  config = full_augmentation()
  whole = take(data.build_input(config, split=split, global_batch_size=24,
                                seed=1).iterator(), 3)
  for count in (2, 3):
    parts = [take(data.build_input(config, split=split, global_batch_size=24, seed=1,
                                   process_index=p, process_count=count).iterator(), 3)
             for p in range(count)]
    for step in range(3):
      for k in whole[step]:
        glued = np.concatenate([parts[p][step][k] for p in range(count)])
        np.testing.assert_array_equal(glued, whole[step][k])
      assert parts[0][step]["label"].shape == (24 // count,)


def test_same_batches_for_0_1_2_workers():
  results = {}
  for workers in (0, 1, 2):
    inp = data.build_input(full_augmentation(workers=workers), split="train",
                           global_batch_size=16, seed=3)
    it = inp.iterator()
    results[workers] = take(it, 5)
    it.close()
  assert_same_batches(results[0], results[1])
  assert_same_batches(results[0], results[2])
  # And validation, whose last batch is padded.
  evals = {}
  for workers in (0, 2):
    inp = data.build_input(digits(workers=workers), split="validation",
                           global_batch_size=100, seed=0)
    evals[workers] = list(inp.iterator())
  assert_same_batches(evals[0], evals[2])


def test_seed_changes_order_and_augmentation():
  a = take(data.build_input(full_augmentation(), split="train", global_batch_size=16,
                            seed=0).iterator(), 1)[0]
  b = take(data.build_input(full_augmentation(), split="train", global_batch_size=16,
                            seed=1).iterator(), 1)[0]
  assert not np.array_equal(a["label"], b["label"])


def test_start_epoch_and_state_across_start_epochs():
  inp = data.build_input(full_augmentation(), split="train", global_batch_size=128,
                         seed=2)
  steps = inp.steps_per_epoch  # 11
  it = inp.iterator()
  stream = take(it, steps + 3)
  assert_same_batches(take(inp.iterator(start_epoch=1), 3), stream[steps:])
  # A state saved from an iterator started at epoch 0, restored into one made with
  # start_epoch=4, continues where the saved one stood.
  it = inp.iterator()
  take(it, steps + 1)
  state = it.get_state()
  other = inp.iterator(start_epoch=4)
  other.set_state(state)
  assert_same_batches(take(other, 2), stream[steps + 1:steps + 3])


@pytest.mark.parametrize("workers", [0, 2])
def test_orbax_checkpoint_restores_the_next_batches(tmp_path, workers):
  config = full_augmentation(workers=workers)
  inp = data.build_input(config, split="train", global_batch_size=32, seed=7)
  reference = inp.iterator()
  expected = take(reference, 6)
  reference.close()

  it = inp.iterator()
  take(it, 3)
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  mngr.save(3, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"w": np.arange(3.0)}),
      data=data.checkpoint_save_args(it)))
  mngr.wait_until_finished()
  it.close()

  fresh = data.build_input(config, split="train", global_batch_size=32,
                           seed=7).iterator()
  restored = mngr.restore(3, args=ocp.args.Composite(
      state=ocp.args.StandardRestore({"w": np.zeros(3)}),
      data=data.checkpoint_restore_args(fresh)))
  np.testing.assert_array_equal(restored.state["w"], np.arange(3.0))
  assert_same_batches(take(fresh, 3), expected[3:])
  fresh.close()
  mngr.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_raises_with_its_path(tmp_path, workers):
  root = make_folder(str(tmp_path))
  bad = os.path.join(root, "val", "dog", "dog_9.JPEG")
  with open(bad, "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 truncated")
  config = data.default_config()
  config.name, config.folder, config.image_size, config.workers = (
      "folder", root, 16, workers)
  inp = data.build_input(config, split="validation", global_batch_size=2, seed=0)
  it = inp.iterator()
  with deadline(120), pytest.raises(data.InvalidDataError, match="dog_9.JPEG"):
    list(it)
  it.close()
