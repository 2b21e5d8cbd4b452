r"""The paper's recipe on ImageNet-100 (all rows of Table 1 share it).

  python -m qlhs_jax.main --config=configs/base.py --workdir=$HOME/runs/eq3

This file trains Eq.(3) ws softball@ds; each model has its own file (eq3.py ...
mobilenetv3.py), all built on ``qlhs_jax.config.base_config``:
SGD-Nesterov 0.9, weight decay 1e-4 off biases and 1-D parameters, label smoothing 0.1,
per-epoch cosine with 5 warmup epochs from 1e-5, peak lr 0.3 at batch 256 (scaled
linearly with --config.batch_size), 50 epochs, 224 px, bfloat16; timm's augmentation
(RandomResizedCrop, flip, RandAugment rand-m7-mstd0.5-inc1, random erasing 0.4).

Data: ImageNet-1k prepared once with TFDS (see README, "Data"); the CMC ImageNet-100
classes are selected from it. Without it the run stops at once with the preparation
command. Hardware: sized for one GPU (H100 80GB, batch 256).
Expected: the time and top-1 of configs/eq3.py (softball_ds): ~20-55 minutes, 83.66 in
the paper.
"""

from qlhs_jax import config as qconfig


def get_config(arg=None):
  cfg, options = qconfig.parse_arg(arg, {"eq3_softball_ds": "eq3_softball_ds"},
                                   "eq3_softball_ds")
  c = qconfig.base_config(cfg)
  return qconfig.apply_options(c, options)
