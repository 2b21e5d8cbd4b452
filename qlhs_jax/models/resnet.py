"""ResNet50, the Table 1 baseline, as timm's ``resnet50`` (stride on the 3x3 conv,
zero-initialised last BN of every bottleneck, ReLU)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from qlhs_jax.models.common import (ConvNorm, Dtype, classifier_head, global_pool,
                                    resnet_stem)


class Bottleneck(nn.Module):
  width: int
  stride: int = 1
  expansion: int = 4
  train: bool = False
  folded: bool = False
  bn_groups: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    common = dict(folded=self.folded, train=self.train, bn_groups=self.bn_groups,
                  dtype=self.dtype, param_dtype=self.param_dtype)
    out_ch = self.width * self.expansion
    y = nn.relu(ConvNorm(self.width, (1, 1), name="conv1", **common)(x))
    y = nn.relu(ConvNorm(self.width, (3, 3), self.stride, name="conv2", **common)(y))
    y = ConvNorm(out_ch, (1, 1), bn_scale_init=nn.initializers.zeros, name="conv3",
                 **common)(y)
    if self.stride != 1 or x.shape[-1] != out_ch:
      x = ConvNorm(out_ch, (1, 1), self.stride, name="shortcut", **common)(x)
    return nn.relu(y + x.astype(y.dtype))


class ResNet(nn.Module):
  """ResNet with bottleneck blocks; ``ResNet()`` is ResNet50."""
  widths: Sequence[int] = (64, 128, 256, 512)
  depths: Sequence[int] = (3, 4, 6, 3)
  num_classes: int = 100
  stem: str = "imagenet"
  stem_pool: str = "argmax_bn"
  stem_pad_channels: int = 4
  stem_conv: str = "space_to_depth"
  folded: bool = False
  bn_groups: int = 1
  dtype: Dtype = jnp.bfloat16
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    common = dict(folded=self.folded, train=train, bn_groups=self.bn_groups,
                  dtype=self.dtype, param_dtype=self.param_dtype)
    x = resnet_stem(x.astype(self.dtype), self.widths[0], self.stem, common,
                    self.stem_pool, self.stem_pad_channels, self.stem_conv)
    for k, (width, depth) in enumerate(zip(self.widths, self.depths)):
      for i in range(depth):
        x = Bottleneck(width, 2 if (k > 0 and i == 0) else 1,
                       name=f"stage{k + 1}_block{i}", **common)(x)
    return classifier_head(global_pool(x), self.num_classes, self.param_dtype)
