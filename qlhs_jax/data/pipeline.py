"""The grain pipeline: :func:`build_input` and the iterator it hands out.

Order of examples. Let N be the number of examples, B the global batch, P processes,
L = B / P the local batch. Train epoch e visits the examples in the order of
``default_rng([1, seed, e]).permutation(N)``; global batch s of the epoch is positions
[s*B, (s+1)*B) of that order (the last N mod B examples of each epoch are dropped), and
process p takes the p-th contiguous slice of L of every global batch. Validation walks
the examples in order, padded at the end to a whole number of global batches; padded
rows have a zero image, label 0 and ``mask`` False.

Each example's augmentation draws from ``default_rng([2, seed, e, i])`` (i: the
example's index in the dataset), so batches depend only on (seed, position): not on the
number of worker processes or threads, and a resumed run sees the same images.

Grain slices the batch stream (not the example stream) over worker processes, because
batching is a MapDataset step before ``to_iter_dataset``: every batch is computed whole
by one worker, and workers' outputs are interleaved back in order.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable

from absl import flags
import grain
import numpy as np

from qlhs_jax.data import config as config_lib
from qlhs_jax.data import errors
from qlhs_jax.data import randaugment as ra
from qlhs_jax.data import sources
from qlhs_jax.data import transforms

_PERMUTATION, _AUGMENT = 1, 2  # Distinct first words of the two kinds of rng seeds.


def make_transform(config, train: bool):
  """The train or eval transform of a (validated) data config."""
  mean, std = tuple(config.mean), tuple(config.std)
  if not train:
    return transforms.EvalTransform(
        size=config.image_size, crop_pct=config.crop_pct,
        interpolation=transforms.INTERPOLATIONS[config.eval_interpolation],
        mean=mean, std=std, jpeg_draft=config.jpeg_draft)
  resample = transforms.interpolation(config.train_interpolation)
  fill = tuple(min(255, round(255 * m)) for m in mean)  # timm's img_mean.
  return transforms.TrainTransform(
      size=config.image_size, scale=tuple(config.rrc_scale),
      ratio=tuple(config.rrc_ratio), interpolation=resample, hflip=config.hflip,
      randaugment=ra.parse(config.randaugment, fill=fill, resample=resample),
      mean=mean, std=std, reprob=config.reprob, remode=config.remode,
      recount=config.recount, jpeg_draft=config.jpeg_draft,
      device_randaugment=config.device_randaugment)


class _Examples:
  """Position in this process's example stream -> example dict (picklable)."""

  def __init__(self, source, transform, train: bool, seed: int, global_batch: int,
               local_batch: int, process_index: int, steps_per_epoch: int,
               device_normalize: bool = False):
    self.source = source
    self.transform = transform
    self.train = train
    self.device_normalize = device_normalize and train
    self.seed = seed
    self.global_batch = global_batch
    self.local_batch = local_batch
    self.process_index = process_index
    self.per_epoch = steps_per_epoch * local_batch
    self._perm = (-1, None)  # (epoch, permutation) of the last epoch seen.

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_perm"] = (-1, None)  # Rebuilt on demand in the worker.
    return state

  def permutation(self, epoch: int) -> np.ndarray:
    cached_epoch, perm = self._perm
    if cached_epoch != epoch:
      perm = np.random.default_rng([_PERMUTATION, self.seed, epoch]).permutation(
          len(self.source))
      self._perm = (epoch, perm)
    return perm

  def __call__(self, k: int) -> dict[str, Any]:
    epoch, j = divmod(int(k), self.per_epoch)
    step, offset = divmod(j, self.local_batch)
    pos = step * self.global_batch + self.process_index * self.local_batch + offset
    if self.train:
      index = int(self.permutation(epoch)[pos])
      rng = np.random.default_rng([_AUGMENT, self.seed, epoch, index])
    else:
      index, rng = pos, None
      if pos >= len(self.source):  # Padding of the last validation batch.
        size = self.transform.size
        return {"image": np.zeros((size, size, 3), np.float32),
                "label": np.int32(0), "mask": np.bool_(False)}
    try:
      if self.device_normalize:
        example = self.transform.device_example(self.source.read(index), rng)
      else:
        example = {"image": self.transform(self.source.read(index), rng)}
    except errors.InvalidDataError as e:
      raise errors.InvalidDataError(f"{self.source.describe(index)}: {e}") from e
    example["label"] = np.int32(self.source.labels[index])
    if not self.train:
      example["mask"] = np.bool_(True)
    return example


class InputIterator(grain.DatasetIterator):
  """The grain iterator of an :class:`Input`, remembering the epoch it started at.

  Its state is ``{"start_epoch": e, "pipeline": <grain's state>}``: restoring a state
  into an iterator made with another ``start_epoch`` rebuilds the pipeline from the
  saved one, so a restored iterator always continues where the saved one stood.
  """

  def __init__(self, make: Callable[[int], grain.DatasetIterator], start_epoch: int):
    super().__init__()
    self._make = make
    self._start_epoch = start_epoch
    self._it = make(start_epoch)

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    return {"start_epoch": self._start_epoch, "pipeline": self._it.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if int(state["start_epoch"]) != self._start_epoch:
      self._it.close()
      self._start_epoch = int(state["start_epoch"])
      self._it = self._make(self._start_epoch)
    self._it.set_state(state["pipeline"])

  def start_prefetch(self) -> None:
    self._it.start_prefetch()

  def close(self) -> None:
    self._it.close()
    super().close()


@dataclasses.dataclass(frozen=True)
class Input:
  """One split of a dataset, batched for this process. Build it with
  :func:`build_input`; iterate with :meth:`iterator`."""
  split: str
  num_examples: int
  num_classes: int
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]
  global_batch_size: int
  local_batch_size: int
  steps_per_epoch: int
  process_index: int
  process_count: int
  seed: int
  workers: int
  read_threads: int
  prefetch: int
  examples: _Examples

  @property
  def train(self) -> bool:
    return self.split == "train"

  def dataset(self, start_epoch: int = 0) -> grain.IterDataset:
    """The grain pipeline: batches of this process from epoch ``start_epoch`` on
    (train: forever; validation: one pass, ``start_epoch`` must be 0)."""
    per_epoch = self.steps_per_epoch * self.local_batch_size
    if self.train:
      ds = grain.MapDataset.range(start_epoch * per_epoch, sys.maxsize)
    elif start_epoch:
      raise ValueError("The validation split makes one pass; start_epoch must be 0")
    else:
      ds = grain.MapDataset.range(0, per_epoch)
    ds = ds.map(self.examples).batch(self.local_batch_size, drop_remainder=True)
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=self.read_threads, prefetch_buffer_size=self.read_threads))
    if self.workers:
      # grain 0.2.18 reads an absl flag when it starts workers and fails if flags were
      # never parsed (google/grain#1355), as in scripts and tests without absl.app.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.workers, per_worker_buffer_size=self.prefetch))
    return ds

  def iterator(self, start_epoch: int = 0) -> InputIterator:
    """A checkpointable iterator of dicts of numpy arrays: ``image`` float32
    [local_batch, H, W, 3], ``label`` int32 [local_batch], and for validation ``mask``
    bool [local_batch] (False on padding). Train batches of a config with
    ``device_normalize`` carry uint8 images instead, and with erasing on, ``erase``
    int32 [local_batch, recount, 4] and ``erase_seed`` uint32 [local_batch], and
    with ``device_randaugment`` the images before RandAugment and the ops drawn for
    them, ``ra_op`` int32, ``ra_arg`` float32 and ``ra_resample`` int32, each
    [local_batch, ops per image]: :func:`qlhs_jax.device_input.train_images_fn`
    turns them into the float32 images."""
    return InputIterator(lambda e: iter(self.dataset(e)), start_epoch)


def build_input(data_config, *, split: str, global_batch_size: int, seed: int,
                process_index: int = 0, process_count: int = 1) -> Input:
  """Builds the input of ``split`` ('train' or 'validation') for one JAX process.

  Train: ``steps_per_epoch = num_examples // global_batch_size`` (the remainder is
  dropped each epoch), reshuffled every epoch from ``seed``, endless. Validation:
  ``ceil(num_examples / global_batch_size)`` steps, one pass, last batch padded and
  marked by ``mask``. Process ``process_index`` of ``process_count`` gets the
  ``process_index``-th contiguous slice of every global batch.
  """
  config_lib.validate(data_config)
  sources.check_split(split)
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive "
                     f"multiple of process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  train = split == "train"
  source = sources.make_source(data_config, split)
  n = len(source)
  if n == 0:
    raise errors.InvalidDataError(
        f"The {split} split of {data_config.name!r} has no examples of the classes "
        f"{list(source.class_names)[:5]}{' ...' if len(source.class_names) > 5 else ''}")
  if train:
    steps = n // global_batch_size
    if steps == 0:
      raise ValueError(f"global_batch_size={global_batch_size} exceeds the "
                       f"{n} training examples")
  else:
    steps = math.ceil(n / global_batch_size)
  local = global_batch_size // process_count
  examples = _Examples(source, make_transform(data_config, train), train, int(seed),
                       global_batch_size, local, process_index, steps,
                       data_config.device_normalize)
  size = data_config.image_size
  return Input(
      split=split, num_examples=n, num_classes=len(source.class_names),
      class_names=tuple(source.class_names), image_shape=(size, size, 3),
      global_batch_size=global_batch_size, local_batch_size=local,
      steps_per_epoch=steps, process_index=process_index, process_count=process_count,
      seed=int(seed), workers=data_config.workers,
      read_threads=data_config.read_threads, prefetch=data_config.prefetch,
      examples=examples)
