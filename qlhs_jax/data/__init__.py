"""The input pipeline: ImageNet-100 (TFDS or a folder), a pre-resized variant and the
embedded digits, augmented as in the recipe, batched and sharded by grain.

Quick use::

  from qlhs_jax import data
  config = data.digits_config(image_size=32)   # or data.default_config() for ImageNet-100
  train = data.build_input(config, split="train", global_batch_size=128, seed=0)
  batch = next(train.iterator())   # {"image": float32 [128, 32, 32, 3], "label": int32 [128]}
"""

from qlhs_jax.data.checkpoint import checkpoint_restore_args, checkpoint_save_args
from qlhs_jax.data.config import default_config, digits_config
from qlhs_jax.data.errors import DataError, DatasetNotFoundError, InvalidDataError
from qlhs_jax.data.pipeline import Input, InputIterator, build_input
from qlhs_jax.data.sources import IMAGENET100_WNIDS_FILE, imagenet100_wnids, resolve_wnids
from qlhs_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "DataError",
    "DatasetNotFoundError",
    "IMAGENET100_WNIDS_FILE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Input",
    "InputIterator",
    "InvalidDataError",
    "build_input",
    "checkpoint_restore_args",
    "checkpoint_save_args",
    "default_config",
    "digits_config",
    "imagenet100_wnids",
    "resolve_wnids",
]
