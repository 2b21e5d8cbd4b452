"""MobileNetV3-Large 1.0, the Table 1 baseline, as timm's ``mobilenetv3_large_100``:
hard-swish, squeeze-excite with a hard-sigmoid gate, a 1280-wide head conv with bias."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qlhs_jax.models.common import ConvNorm, Dtype, classifier_head, global_pool

# timm's arch_def for mobilenetv3_large_100, one row per block:
# (kernel, stride, expanded channels, out channels, squeeze-excite, activation).
# Expanded channels are make_divisible(in * ratio, 8) as timm computes them.
LARGE_BLOCKS = (
    (3, 1, 16, 16, False, "relu"),   # depthwise-separable block (no expansion conv)
    (3, 2, 64, 24, False, "relu"), (3, 1, 72, 24, False, "relu"),
    (5, 2, 72, 40, True, "relu"), (5, 1, 120, 40, True, "relu"), (5, 1, 120, 40, True, "relu"),
    (3, 2, 240, 80, False, "hswish"), (3, 1, 200, 80, False, "hswish"),
    (3, 1, 184, 80, False, "hswish"), (3, 1, 184, 80, False, "hswish"),
    (3, 1, 480, 112, True, "hswish"), (3, 1, 672, 112, True, "hswish"),
    (5, 2, 672, 160, True, "hswish"), (5, 1, 960, 160, True, "hswish"),
    (5, 1, 960, 160, True, "hswish"),
)


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
  """timm's channel rounding."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < round_limit * v else new_v


def _act(name):
  return {"relu": nn.relu, "hswish": jax.nn.hard_swish}[name]


class SqueezeExcite(nn.Module):
  """x * hard_sigmoid(W2 relu(W1 mean(x) + b1) + b2), reduced width make_divisible(c/4)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                     kernel_init=nn.initializers.variance_scaling(
                                         2.0, "fan_out", "normal"), name=name)
    s = nn.relu(dense(make_divisible(c * 0.25), "reduce")(s))
    return x * jax.nn.hard_sigmoid(dense(c, "expand")(s))


class InvertedResidual(nn.Module):
  kernel: int
  stride: int
  mid: int
  out: int
  se: bool
  act: str
  depthwise_separable: bool = False
  train: bool = False
  folded: bool = False
  bn_groups: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    common = dict(folded=self.folded, train=self.train, bn_groups=self.bn_groups,
                  dtype=self.dtype, param_dtype=self.param_dtype)
    act = _act(self.act)
    y = x
    if not self.depthwise_separable:
      y = act(ConvNorm(self.mid, (1, 1), name="expand", **common)(y))
    y = act(ConvNorm(self.mid, (self.kernel,) * 2, self.stride, groups=self.mid,
                     name="depthwise", **common)(y))
    if self.se:
      y = SqueezeExcite(self.dtype, self.param_dtype, name="se")(y)
    y = ConvNorm(self.out, (1, 1), name="project", **common)(y)
    if self.stride == 1 and x.shape[-1] == self.out:
      y = y + x
    return y


class MobileNetV3Large(nn.Module):
  num_classes: int = 100
  head_features: int = 1280
  folded: bool = False
  bn_groups: int = 1
  dtype: Dtype = jnp.bfloat16
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    common = dict(folded=self.folded, train=train, bn_groups=self.bn_groups,
                  dtype=self.dtype, param_dtype=self.param_dtype)
    x = jax.nn.hard_swish(ConvNorm(16, (3, 3), 2, name="stem", **common)(x.astype(self.dtype)))
    for i, (k, s, mid, out, se, act) in enumerate(LARGE_BLOCKS):
      x = InvertedResidual(k, s, mid, out, se, act, depthwise_separable=(i == 0),
                           name=f"block{i}", **common)(x)
    x = jax.nn.hard_swish(ConvNorm(960, (1, 1), name="final_conv", **common)(x))
    x = global_pool(x)
    head_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
    # timm: pooled features -> 1x1 conv (with bias, no BN) -> hard-swish -> classifier.
    x = jax.nn.hard_swish(nn.Dense(self.head_features, dtype=head_dtype,
                                   param_dtype=self.param_dtype,
                                   kernel_init=nn.initializers.variance_scaling(
                                       2.0, "fan_out", "normal"), name="head_conv")(x))
    return classifier_head(x, self.num_classes, self.param_dtype)
