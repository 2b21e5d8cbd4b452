"""Pieces shared by every model of the zoo: BatchNorm, conv+BN, initialisers, stems.

Every model takes ``folded: bool``. With ``folded=False`` a conv followed by BatchNorm
holds ``{"kernel", "bn": {"scale", "bias"}}`` (running statistics in ``batch_stats``);
with ``folded=True`` the same module holds ``{"kernel", "bias"}``: the BN has been folded
into the conv by :func:`qlhs_jax.models.fold.fold_batchnorm`. One code path describes
the data flow of both.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qlhs_jax.kernels import settings
from qlhs_jax.models.layers import _out_size, _taps

Dtype = Any

# PyTorch's kaiming_normal_(mode="fan_out"), as timm initialises its ConvNets.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # PyTorch's momentum 0.1


def torch_linear_init(fan_in: int):
  """PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


BN_STATS_FORMS = ("one", "two")


def bn_stats_form() -> str:
  """How training-mode BatchNorm sums x and x * x: QLHS_BN_STATS, else "one"
  (:func:`sums_and_squares`, one reduction); "two" is two ``jnp.sum`` calls, the form
  before 2026-12-03, kept to time against it on the GPU (``gpu_h100.sh configs``). The
  same statistics either way (tests/models/test_common.py)."""
  return settings.choice("QLHS_BN_STATS", BN_STATS_FORMS)


STEM_GRAD_FORMS = ("pass", "classes")


def stem_grad_form() -> str:
  """How the backward of :func:`bn_relu_max_pool_3x3_s2` writes the stem's dL/dy:
  QLHS_STEM_GRAD, else "pass" (:func:`_pool_bn_grad`, one element-wise pass); "classes"
  is the form before 2026-12-05 (each parity class on the pooled grid, then a stack),
  kept to time against it on the GPU (``gpu_h100.sh pool``). The same values, bit for
  bit (tests/models/test_common.py)."""
  return settings.choice("QLHS_STEM_GRAD", STEM_GRAD_FORMS)


STEM_TAPS_FORMS = ("margin", "pad")


def stem_taps_form() -> str:
  """Where the training stem's max-pool reads its taps (ConvNorm with
  ``relu_max_pool``): QLHS_STEM_TAPS, else "margin" (:func:`conv_bn_relu_max_pool_3x3_s2`:
  the convolution writes one output row and column more on each side, so that every tap
  is a plain strided slice); "pad" is the form before 2026-12-05 (the convolution, then
  :func:`bn_relu_max_pool_3x3_s2`, which pads with -inf), kept to time against it on the
  GPU (``gpu_h100.sh pool``). The same values (tests/models/test_common.py)."""
  return settings.choice("QLHS_STEM_TAPS", STEM_TAPS_FORMS)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def sums_and_squares(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """``(sum(x), sum(x * x))`` over ``axes``, as one reduction with two outputs (a
  variadic ``lax.reduce``), so that the compiled program reads ``x`` once. Written as
  two ``jnp.sum`` (or ``jnp.mean``) calls, XLA's GPU compiler emitted two reductions
  that each read ``x``: in the deviceless H100 compile of a BatchNorm after a matmul at
  stage 1, 0.617 GB against 0.514 (benchmarks/bn_stats_probe.py); over a train step,
  Eq.(3) moves 0.97 GB less and ResNet50 4.57 GB less (benchmarks.aot;
  benchmarks/NOTES.md, experiment 15). The derivative
  is written out (``custom_jvp``): JAX's own derivative of a variadic reduce is a pile
  of slices and adds that reads ``x`` more often than the two reductions did."""
  zero = jnp.zeros((), x.dtype)
  return lax.reduce((x, x * x), (zero, zero),
                    lambda a, b: (a[0] + b[0], a[1] + b[1]), axes)


@sums_and_squares.defjvp
def _sums_and_squares_jvp(axes, primals, tangents):
  (x,), (dx,) = primals, tangents
  return sums_and_squares(x, axes), (jnp.sum(dx, axes), 2 * jnp.sum(x * dx, axes))


def group_sums(x, groups: int, dtype):
  """``x`` as (groups, B / groups, H, W, C) in ``dtype``, its sums and sums of squares
  over each group's batch and pixels, (groups, C) each, and the count of values a sum
  adds: BatchNorm's one pass over the data, from one reduction (:func:`sums_and_squares`;
  two with QLHS_BN_STATS=two)."""
  b, c = x.shape[0], x.shape[-1]
  if b % groups:
    raise ValueError(f"batch {b} does not split into {groups} BatchNorm groups")
  xg = x.reshape((groups, b // groups) + x.shape[1:]).astype(dtype)
  axes = tuple(range(1, xg.ndim - 1))
  if bn_stats_form() == "one":
    s1, s2 = sums_and_squares(xg, axes)
  else:
    s1, s2 = jnp.sum(xg, axes), jnp.sum(xg * xg, axes)
  return xg, s1, s2, xg.size // (groups * c)


def _per_group(v, ndim: int = 5):
  """Per-group vectors (groups, C) against (groups, B / groups, ..., C) of ``ndim`` axes."""
  return v.reshape(v.shape[:1] + (1,) * (ndim - 2) + v.shape[1:])


def _bn_affine(mean, var, scale, bias):
  """BatchNorm as y = x * mul + add: ``(mul, add)``."""
  mul = lax.rsqrt(var + BN_EPS) * scale
  return mul, bias - mean * mul


def _bn_moments(s1, s2, scale, bias, count: int):
  """BatchNorm's per-channel arithmetic from the sums of x and x * x over ``count``
  values, as :class:`BatchNorm` does it: ``(mul, add, mean, var)``, y = x * mul + add."""
  mean = s1 / count
  var = jnp.maximum(s2 / count - mean * mean, 0.0)
  return (*_bn_affine(mean, var, scale, bias), mean, var)


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, PyTorch conventions (eps 1e-5, momentum 0.1,
  unbiased running variance).

  ``groups`` > 1 computes statistics separately on each of ``groups`` equal slices of the
  batch ("per-replica" BN, as timm's DDP training does: with the batch sharded over
  ``groups`` devices each slice stays on its device). The running averages are updated
  with the mean over groups of the group statistics; since the exponential moving average
  is linear, that equals keeping one running average per replica and averaging them
  across replicas (timm's ``--dist-bn reduce``), which the recipe does once per epoch.
  ``groups == 1`` over a sharded batch is cross-replica (sync) BN.

  ``relu_max_pool``: then ReLU and ResNet's stem max-pool (3x3, stride 2); in training
  the three as one operation, :func:`bn_relu_max_pool_3x3_s2`.
  """
  use_running_average: bool
  groups: int = 1
  scale_init: Any = nn.initializers.ones
  relu_max_pool: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, conv=None):
    """``conv``: with ``relu_max_pool`` in training, x may instead be given as ``(x,
    kernel, strides, space_to_depth)``, the input of the :func:`stem_conv` whose output
    this normalises (``x`` None): the layer computes it, by
    :func:`conv_bn_relu_max_pool_3x3_s2`."""
    if conv is not None:
      if x is not None or not self.relu_max_pool or self.use_running_average:
        raise ValueError("BatchNorm(conv=...) is for training with relu_max_pool=True, "
                         "with x None")
      x_in, kernel, strides, space_to_depth = conv
      shape = (x_in.shape[0],) + _conv_out(x_in, kernel, strides) + kernel.shape[-1:]
      dtype = jnp.result_type(x_in, kernel)
    else:
      shape, dtype = x.shape, x.dtype
    if self.relu_max_pool and dtype != self.dtype:
      raise ValueError(f"BatchNorm(relu_max_pool=True) takes x in its dtype "
                       f"{jnp.dtype(self.dtype).name}, got {dtype}")
    c = shape[-1]
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    sdt = jnp.promote_types(self.param_dtype, jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), sdt))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), sdt))
    stat_dtype = jnp.promote_types(self.dtype, jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value.astype(stat_dtype), ra_var.value.astype(stat_dtype)
    else:
      if self.relu_max_pool:
        y, mean, var = (
            bn_relu_max_pool_3x3_s2(x, scale, bias, self.groups) if conv is None else
            conv_bn_relu_max_pool_3x3_s2(x_in, kernel, scale, bias, strides,
                                         space_to_depth, self.groups))
        count = math.prod(shape) // (self.groups * c)
      else:
        # One pass over the data: E[x] and E[x^2] in float32, their sums from one
        # reduction (two with QLHS_BN_STATS=two).
        xg, s1, s2, count = group_sums(x, self.groups, stat_dtype)
        mul, add, mean, var = _bn_moments(s1, s2, scale.astype(stat_dtype),
                                          bias.astype(stat_dtype), count)
        y = xg * _per_group(mul, xg.ndim) + _per_group(add, xg.ndim)
        y = y.reshape(x.shape).astype(self.dtype)
      if not self.is_initializing():
        update_running_stats(ra_mean, ra_var, mean, var, count)
      return y
    mul, add = _bn_affine(mean, var, scale.astype(stat_dtype), bias.astype(stat_dtype))
    y = (x.astype(stat_dtype) * mul + add).astype(self.dtype)
    return relu_max_pool_3x3_s2(y) if self.relu_max_pool else y


def update_running_stats(ra_mean, ra_var, mean, var, count: int):
  """PyTorch's running averages from per-group batch statistics ``mean``, ``var``
  (groups, c), biased, over ``count`` values per group: the group mean of each (see
  :class:`BatchNorm`), the variance made unbiased."""
  sdt = ra_mean.value.dtype
  unbiased = var * (count / max(count - 1, 1))
  m = BN_MOMENTUM
  ra_mean.value = (m * ra_mean.value + (1 - m) * jnp.mean(mean, 0)).astype(sdt)
  ra_var.value = (m * ra_var.value + (1 - m) * jnp.mean(unbiased, 0)).astype(sdt)


def batchnorm_affine(bn_params, bn_stats):
  """The eval-mode BatchNorm as ``y = a * x + b``: returns ``(a, b)``."""
  a = bn_params["scale"] * lax.rsqrt(bn_stats["var"].astype(bn_params["scale"].dtype) + BN_EPS)
  b = bn_params["bias"] - bn_stats["mean"].astype(a.dtype) * a
  return a, b


def space_to_depth_conv(x, kernel, margin=((0, 0), (0, 0))):
  """The ``k`` x ``k`` convolution of stride 2 and padding ``k // 2`` on every side (odd
  ``k``, NHWC, HWIO, ungrouped) as a stride-1 convolution of ``(k + 1) // 2`` squared
  taps on the image's 2x2 blocks, each block's pixels as 4x the channels.

  Output pixel ``o`` reads padded input ``2*o + d``, d = 0 .. k-1; with d = 2*q + r that
  is block ``o + q``, pixel ``r`` of it. So the kernel, zero-padded to k + 1 taps, is
  regrouped as ``K[q, (r, c)] = k[2*q + r, c]`` and the padded image as blocks ``X[a,
  (r, c)] = x[2*a + r, c]`` (the same (row parity, column parity, channel) order); the
  added tap d = k has zero weights and adds nothing. The same sums as the direct
  convolution, in another order; the kernel's gradient flows back through the
  regrouping to ``kernel`` itself.

  Why: cuDNN ran the stem's 7x7/2 convolution of 3 (or 4) channels at ~17 TFLOP/s on
  the H100 and the H200 (1.7-1.8 ms forward and 1.1-1.2 ms for the kernel's gradient a
  step at batch 256, benchmarks/NOTES.md experiments 13 and 23). Blocked, it is a 4x4
  stride-1 convolution of 16 channels (with the stem's zero fourth channel), the shape
  tensor cores take, at 256 multiply-adds an output value against the 147 that count.
  MLPerf's TPU ResNet-50 computes its stem the same way ("space-to-depth").

  ``margin``: ((top, bottom), (left, right)) output rows and columns more on each side,
  the convolution's values at those positions (:func:`stem_conv`).
  """
  b, h, w, c = x.shape
  kh, kw, kc, o = kernel.shape
  if kh % 2 == 0 or kw % 2 == 0 or kc != c:
    raise ValueError(f"space_to_depth_conv: want an odd kernel over the input's {c} "
                     f"channels, got kernel {kernel.shape}")
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # (h + 2*(k//2) - k) // 2 + 1
  qh, qw = (kh + 1) // 2, (kw + 1) // 2
  # Padding k//2 in front, and behind up to the 2*(ho + qh - 1) rows the taps reach.
  rows, cols = 2 * (ho + qh - 1), 2 * (wo + qw - 1)
  x = jnp.pad(x, ((0, 0), (kh // 2, rows - h - kh // 2), (kw // 2, cols - w - kw // 2),
                  (0, 0)))
  x = x.reshape(b, rows // 2, 2, cols // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, rows // 2, cols // 2, 4 * c)
  k = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
  k = k.reshape(qh, 2, qw, 2, c, o).transpose(0, 2, 1, 3, 4, 5).reshape(qh, qw, 4 * c, o)
  # A margin is the blocked convolution's own zero padding: the blocks stay those of
  # the plain form, which the kernel's gradient reads (conv_bn_relu_max_pool_3x3_s2).
  return lax.conv_general_dilated(x, k, (1, 1), [(m0, m1) for m0, m1 in margin],
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def stem_conv(x, kernel, strides: int, space_to_depth: bool,
              margin=((0, 0), (0, 0))):
  """:class:`ConvNorm`'s ungrouped ``k`` x ``k`` convolution (odd k, padding k // 2;
  :func:`space_to_depth_conv` where ``space_to_depth``) with ``margin`` = ((top,
  bottom), (left, right)) output positions more on each side: the convolution's values
  there, the input's zero padding widened by ``strides`` a position."""
  if space_to_depth:
    return space_to_depth_conv(x, kernel, margin)
  pad = [(k // 2 + strides * m0, k // 2 + strides * m1)
         for k, (m0, m1) in zip(kernel.shape[:2], margin)]
  return lax.conv_general_dilated(x, kernel, (strides,) * 2, pad,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


class ConvNorm(nn.Module):
  """Convolution (bias-free) followed by BatchNorm; with ``folded`` a convolution with bias.

  ``padding`` defaults to PyTorch's ``k // 2`` on every side. ``pad_in_channels``: the
  input's channels are zero-padded up to this many before the (ungrouped) convolution,
  and the kernel's input channels with zeros that are not parameters, so the values,
  parameters and gradients are those of the unpadded convolution (ResNet's stem, see
  :func:`resnet_stem`). ``space_to_depth``: a stride-2 convolution computed by
  :func:`space_to_depth_conv` (the same parameters and sums). ``relu_max_pool``: then
  ReLU and ResNet's stem max-pool, in training with the BatchNorm as one operation
  (:func:`bn_relu_max_pool_3x3_s2`), and by default with the convolution too
  (:func:`conv_bn_relu_max_pool_3x3_s2`, :func:`stem_taps_form`).
  """
  features: int
  kernel_size: Sequence[int] = (1, 1)
  strides: int = 1
  groups: int = 1
  bn_scale_init: Any = nn.initializers.ones
  folded: bool = False
  train: bool = False
  bn_groups: int = 1
  pad_in_channels: int = 0
  space_to_depth: bool = False
  relu_max_pool: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = tuple(self.kernel_size)
    in_ch = x.shape[-1]
    # timm's fan_out for grouped convs counts the outputs of one group.
    fan_scale = 2.0 * self.groups if self.groups > 1 else 2.0
    init = nn.initializers.variance_scaling(fan_scale, "fan_out", "normal")
    kernel = self.param("kernel", init, k + (in_ch // self.groups, self.features),
                        self.param_dtype)
    pad = tuple((kk // 2, kk // 2) for kk in k)
    extra = self.pad_in_channels - in_ch
    if extra > 0:
      if self.groups != 1:
        raise ValueError(f"pad_in_channels={self.pad_in_channels} needs an ungrouped "
                         f"convolution (groups={self.groups})")
      x = jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, extra),))
      kernel = jnp.pad(kernel, ((0, 0),) * (kernel.ndim - 2) + ((0, extra), (0, 0)))
    if self.space_to_depth and (self.strides != 2 or self.groups != 1):
      raise ValueError(f"space_to_depth computes an ungrouped stride-2 convolution, got "
                       f"strides={self.strides}, groups={self.groups}")
    bn = BatchNorm(use_running_average=not self.train, groups=self.bn_groups,
                   scale_init=self.bn_scale_init, relu_max_pool=self.relu_max_pool,
                   dtype=self.dtype, param_dtype=self.param_dtype, name="bn")
    if (self.relu_max_pool and self.train and not self.folded
        and stem_taps_form() == "margin"):
      if self.groups != 1 or any(kk % 2 == 0 for kk in k):
        raise ValueError(f"ConvNorm(relu_max_pool=True) in training wants an ungrouped "
                         f"convolution of odd size, got {k}, groups={self.groups} (or "
                         f"set kernels.stem_taps='pad')")
      # The convolution, BatchNorm and the pool as one operation: the pool's taps read
      # the convolution's output with a margin (conv_bn_relu_max_pool_3x3_s2).
      return bn(None, conv=(x.astype(self.dtype), kernel.astype(self.dtype),
                            self.strides, self.space_to_depth))
    if self.space_to_depth:
      y = space_to_depth_conv(x.astype(self.dtype), kernel.astype(self.dtype))
    elif k == (1, 1):
      if self.strides > 1:
        x = x[:, ::self.strides, ::self.strides, :]
      y = jnp.dot(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
    else:
      y = lax.conv_general_dilated(
          x.astype(self.dtype), kernel.astype(self.dtype), (self.strides,) * 2, pad,
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)
    if self.folded:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,),
                         self.param_dtype).astype(self.dtype)
      return relu_max_pool_3x3_s2(y) if self.relu_max_pool else y
    return bn(y)


STEM_POOLS = ("argmax_bn", "argmax", "argmax_fused", "autodiff")
STEM_CONVS = ("direct", "space_to_depth")


def resnet_stem(x, width: int, stem: str, common: dict, pool: str = "argmax_bn",
                pad_channels: int = 0, conv: str = "direct"):
  """ResNet's stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) or, for tiny images, "small":
  a 3x3 stride-1 conv, BN, ReLU and no pooling. ``pool`` computes ReLU + max-pool as
  :func:`relu_max_pool_3x3_s2` ("argmax"), in training with the BatchNorm before it as
  one operation (:func:`bn_relu_max_pool_3x3_s2`, "argmax_bn"), as
  :func:`relu_max_pool_3x3_s2_fused` ("argmax" with its backward of before 2026-12-04,
  "argmax_fused") or as ``nn.relu`` + ``nn.max_pool`` differentiated by JAX
  ("autodiff"). The values and gradients are the same: in bfloat16, to one rounding
  where an input is the maximum of several windows, and where "argmax_bn" does not
  round the pool's gradient before BatchNorm's backward; "argmax" and "argmax_fused"
  bit for bit.

  ``pad_channels``: the 7x7 convolution's input is zero-padded to this many channels
  (``ConvNorm.pad_in_channels``; the same values, parameters and gradients). Why: XLA
  hands the 3-channel image to cuDNN as it is, and cuDNN's tensor-core kernels want
  channels in multiples of 4 or 8; NVIDIA's convolution guide says that for a first
  layer of stride 2, padding 3 channels to 4 is enough. On the H100 the unpadded stem
  convolution ran at 17 TFLOP/s, 1.8 ms forward and 1.2 ms for its weight gradient a
  step (benchmarks/NOTES.md, experiments 13 and 17).

  ``conv``: the 7x7/2 convolution as one ("direct") or by :func:`space_to_depth_conv`
  (a 4x4 stride-1 convolution on 2x2 blocks; the same parameters and sums)."""
  if pool not in STEM_POOLS:
    raise ValueError(f"unknown stem_pool {pool!r}; choose one of {STEM_POOLS}")
  if conv not in STEM_CONVS:
    raise ValueError(f"unknown stem_conv {conv!r}; choose one of {STEM_CONVS}")
  if stem == "imagenet":
    y = ConvNorm(width, (7, 7), 2, name="stem", pad_in_channels=pad_channels,
                 space_to_depth=conv == "space_to_depth",
                 relu_max_pool=pool == "argmax_bn", **common)(x)
    if pool == "argmax_bn":
      return y
    if pool == "autodiff":
      return max_pool_3x3_s2(nn.relu(y))
    return (relu_max_pool_3x3_s2 if pool == "argmax" else relu_max_pool_3x3_s2_fused)(y)
  if stem == "small":
    return nn.relu(ConvNorm(width, (3, 3), 1, name="stem", **common)(x))
  raise ValueError(f"unknown stem {stem!r}; choose 'imagenet' or 'small'")


def classifier_head(x, num_classes: int, param_dtype, name: str = "head"):
  """The float32 classifier (PyTorch nn.Linear initialisation) on pooled features."""
  head_dtype = jnp.promote_types(param_dtype, jnp.float32)
  fan_in = x.shape[-1]
  return nn.Dense(num_classes, dtype=head_dtype, param_dtype=param_dtype,
                  kernel_init=torch_linear_init(fan_in),
                  bias_init=torch_linear_init(fan_in), name=name)(x.astype(head_dtype))


def global_pool(x):
  """Global average pooling, in float32 (the head computes float32 logits)."""
  return jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))


def max_pool_3x3_s2(x):
  """ResNet's stem max-pool: 3x3, stride 2, padding 1 (PyTorch padding pads with -inf)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


@jax.custom_vjp
def relu_max_pool_3x3_s2(x):
  """``max_pool_3x3_s2(relu(x))`` as one operation that keeps, per output, the tap its
  gradient goes to (int8; 9: none), so that the backward is a gather from the pooled
  gradient instead of XLA's select-and-scatter.

  Why: JAX differentiates the max-pool by recomputing the window maxima with four int32
  index arrays, then scattering into a zeroed padded input. Compiled for an H100 at batch
  256, the pool's kernels move 4.4 GB per step that way. This way the forward moves
  0.57 GB (benchmarks/NOTES.md, experiment 5).
  The backward works by parity class (:func:`_relu_max_pool_bwd`) and writes the input's
  gradient once, in the input's dtype, for the stem BatchNorm's backward to read. Its
  first form (:func:`relu_max_pool_3x3_s2_fused`) moved 0.87 GB less a step: XLA fused
  it into both kernels of that backward. But there every input pixel evaluated all nine
  taps' transposes, and the two kernels took 1.4 ms each on the H100 for 0.57 and
  0.98 GB: the same time for different bytes, as if bound by that arithmetic
  (experiments 13 and 17; the new form is not yet timed).
  Same values and gradients as JAX's: the maximum starts at ReLU's 0, a later tap
  replaces it only when strictly larger, so the gradient goes to the first maximal tap
  in the window's row-major order, as JAX's select-and-scatter (``ge``) picks it, and
  to no tap where the maximum is 0 (ReLU's gradient at x <= 0 is 0). NaN propagates as in
  ``lax.max``. tests/models/test_common.py checks both against JAX's autodiff, ties
  included. One difference: an input that is the maximum of several windows (up to
  four) gets their gradients summed in float32 and rounded once; JAX's scatter adds in
  the input dtype, so in bfloat16 the two can differ by that rounding.
  """
  return _relu_max_pool_fwd(x)[0]


def _relu_argmax_pool(x, carried=None):
  """The window maxima of relu(x), the tap each gradient goes to (int8; 9: none) and,
  if ``carried`` (the shape of ``x``) is given, its value at that tap (0 at none)."""
  taps = _taps(x, 2, -jnp.inf)  # the window's nine inputs, -inf outside the image
  return _argmax_taps(taps, None if carried is None else _taps(carried, 2))


def _argmax_taps(taps, carried_taps=None, inside=None):
  """:func:`_relu_argmax_pool` from the nine taps (and ``carried``'s), a tap taken only
  where ``inside[t]`` (a mask, None: everywhere) says it lies in the image."""
  m, idx = jnp.zeros_like(taps[0]), jnp.full(taps[0].shape, 9, jnp.int8)
  at = None if carried_taps is None else jnp.zeros(taps[0].shape, carried_taps[0].dtype)
  for t, tap in enumerate(taps):
    take = (tap > m) | jnp.isnan(tap)
    if inside is not None and inside[t] is not None:
      take = take & inside[t]
    m, idx = jnp.where(take, tap, m), jnp.where(take, jnp.int8(t), idx)
    if carried_taps is not None:
      at = jnp.where(take, carried_taps[t], at)
  return m, idx, at


# The margin (stem_conv) around the stem convolution's output that holds every tap of the
# 3x3/2 pool with padding 1: one row and column on each side. The pool needs the one in
# front, and behind only where the size is odd; but cuDNN takes symmetric padding alone,
# and for the front alone XLA wrote the blocked image again, padded (0.22 GB a step).
_STEM_MARGIN = ((1, 1), (1, 1))


def _relu_argmax_pool_in_margin(x, carried, h: int, w: int):
  """:func:`_relu_argmax_pool` of the (h, w) image that ``x`` holds inside its margin
  (:data:`_STEM_MARGIN`), ``carried`` (or None) alike: each tap a strided slice of
  ``x``, and the margin's positions masked out (first row and column, the last where h
  or w is odd).

  Training only: in the BN-folded eval forward (no argmax, no carried values) the
  padded form's kernel is not bound by its instructions (299 a thread, a floor of 0.115
  ms against 0.171 to copy on an H100), and the margin's would only add bytes
  (``python benchmarks/stem_pool_probe.py``)."""
  b, c = x.shape[0], x.shape[-1]
  ho, wo = _out_size(h, 2), _out_size(w, 2)
  oy, ox = np.arange(ho).reshape(1, ho, 1, 1), np.arange(wo).reshape(1, 1, wo, 1)
  # Tap d of output o reads margin position 2 * o + d: position 0 is the margin, and so
  # is position 2 * Ho = h + 1 where h is odd. NumPy masks: constants in the program
  # (from iotas, XLA launched two small kernels a step for them).
  rows = (oy > 0, None, 2 * oy + 1 < h if h % 2 else None)
  cols = (ox > 0, None, 2 * ox + 1 < w if w % 2 else None)
  both = lambda r, q: r if q is None else q if r is None else r & q  # noqa: E731
  inside = [None if (m := both(rows[dy], cols[dx])) is None else jnp.asarray(m)
            for dy in range(3) for dx in range(3)]
  tap = lambda a, dy, dx: lax.slice(  # noqa: E731
      a, (0, dy, dx, 0), (b, dy + 2 * ho - 1, dx + 2 * wo - 1, c), (1, 2, 2, 1))
  return _argmax_taps([tap(x, dy, dx) for dy in range(3) for dx in range(3)],
                      None if carried is None else
                      [tap(carried, dy, dx) for dy in range(3) for dx in range(3)],
                      inside)


def _relu_max_pool_fwd(x):
  m, idx, _ = _relu_argmax_pool(x)
  return m, (idx, x.shape)


def _pool_grad_classes(idx, gf):
  """The pool's input gradient by parity class: ``{(py, px): class}``, each on the
  pooled grid, in ``gf``'s dtype. Window a covers input rows 2a-1, 2a, 2a+1 (taps dy = 0,
  1, 2), so an even row 2a takes tap dy=1 of window a alone and an odd row 2a+1 takes
  dy=2 of window a and dy=0 of window a+1; columns likewise. Class (py, px) holds input
  pixel (2a + py, 2b + px) at (a, b): at most four masked gradients of the pooled grid,
  summed in ascending tap order."""
  zero = jnp.zeros((), gf.dtype)

  def next_window(x, axis):  # window a+1's value at a; zero past the last window
    pads = [(0, 0, 0)] * 4
    pads[axis] = (-1, 1, 0)
    return lax.pad(x, zero, pads)
  along = {0: ((1, False),), 1: ((0, True), (2, False))}  # parity: (tap, next window)
  classes = {}
  for py in (0, 1):
    for px in (0, 1):
      out = None
      for dy, ny in along[py]:
        for dx, nx in along[px]:
          part = jnp.where(idx == 3 * dy + dx, gf, zero)
          part = next_window(part, 1) if ny else part
          part = next_window(part, 2) if nx else part
          out = part if out is None else out + part
      classes[py, px] = out
  return classes


def _interleave_classes(classes, h, w):
  """The input grid (B, h, w, C) from the four parity classes of :func:`_pool_grad_classes`
  (a stack and a reshape; the last row and column dropped where h or w is odd)."""
  b, ho, wo, c = classes[0, 0].shape
  rows = [jnp.stack([classes[py, 0], classes[py, 1]], axis=3) for py in (0, 1)]
  return jnp.stack(rows, axis=2).reshape(b, 2 * ho, 2 * wo, c)[:, :h, :w]


def _relu_max_pool_bwd(res, g):
  """The input's gradient by parity class (:func:`_pool_grad_classes`), each class summed
  in float32 and rounded once; a stack and a reshape interleave them."""
  idx, (_, h, w, _) = res
  gf = g.astype(jnp.promote_types(g.dtype, jnp.float32))
  # Rounded per class: a stack of float32 classes was stored in float32 (0.82 GB).
  classes = {k: v.astype(g.dtype) for k, v in _pool_grad_classes(idx, gf).items()}
  return (_interleave_classes(classes, h, w),)


def _relu_max_pool_bwd_nine(res, g):
  """The input's gradient as the nine taps' transposes, summed over the input grid."""
  idx, (_, h, w, _) = res
  ho, wo = g.shape[1:3]
  acc = jnp.promote_types(g.dtype, jnp.float32)
  gf, zero = g.astype(acc), jnp.zeros((), acc)
  out = None
  for t in range(9):
    dy, dx = divmod(t, 3)
    # The transpose of tap t's slice: g at input (2*oy + dy - 1, 2*ox + dx - 1), i.e. g
    # dilated by 2 and shifted (negative padding crops). An input can take the gradient
    # of up to four windows: summed in float32 and rounded once.
    part = lax.pad(jnp.where(idx == t, gf, zero), zero,
                   ((0, 0, 0), (dy - 1, h - dy - 2 * ho + 2, 1),
                    (dx - 1, w - dx - 2 * wo + 2, 1), (0, 0, 0)))
    out = part if out is None else out + part
  return (out.astype(g.dtype),)


relu_max_pool_3x3_s2.defvjp(_relu_max_pool_fwd, _relu_max_pool_bwd)


@jax.custom_vjp
def relu_max_pool_3x3_s2_fused(x):
  """:func:`relu_max_pool_3x3_s2` with its first backward (``stem_pool="argmax_fused"``):
  the nine taps' transposes summed over the input grid, which XLA fuses into the stem
  BatchNorm's backward. The fewest bytes, but on the H100 the two kernels of that
  backward took 1.4 ms each, likely for each input pixel's nine padding checks."""
  return _relu_max_pool_fwd(x)[0]


relu_max_pool_3x3_s2_fused.defvjp(_relu_max_pool_fwd, _relu_max_pool_bwd_nine)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def bn_relu_max_pool_3x3_s2(y, scale, bias, groups: int = 1):
  """Training-mode :class:`BatchNorm` of ``y`` (B, H, W, C), then
  :func:`relu_max_pool_3x3_s2`, as one operation (``stem_pool="argmax_bn"``): returns
  ``(pooled, mean, var)``, the batch statistics (groups, C) for the running averages.
  The same float32 arithmetic as BatchNorm then the pool (the same values, to the
  contractions XLA chooses).

  Why: in the backward, the pool's input gradient is nonzero only at each window's
  chosen tap, so BatchNorm's two sums over it, sum(g) and sum(g * y), are sums over the
  pooled grid of the window's gradient and of ``y`` at its tap (kept by the forward,
  int8 tap and bfloat16 value). The dense gradient then has one reader, the
  element-wise dL/dy = g * mul + dL/ds1 + 2 y dL/ds2, computed from the pooled
  gradient (:func:`_pool_bn_grad`) and never stored. Before, the pool's backward wrote
  it (0.41 GB at batch 256, 224 px) and BatchNorm's reduction and element-wise kernel
  read it (benchmarks/NOTES.md, experiment 26). The per-channel part is JAX's own
  derivative of :func:`_bn_moments`. dL/dy sums a pixel's windows in float32 and rounds
  once, where BatchNorm after :func:`relu_max_pool_3x3_s2` rounds the pool's gradient to
  ``y``'s dtype first: in bfloat16 the two differ by that rounding.
  """
  return _bn_pool_fwd(y, scale, bias, groups)[0]


def _bn_pool_fwd(y, scale, bias, groups, y_m=None):
  """``y_m``: y with its margin (:func:`conv_bn_relu_max_pool_3x3_s2`), y the image
  inside it; BatchNorm is then applied to y_m and the pool reads its taps there."""
  yg, s1, s2, count = group_sums(y, groups, jnp.promote_types(y.dtype, jnp.float32))
  sdt = yg.dtype
  mul, add, mean, var = _bn_moments(s1, s2, scale.astype(sdt), bias.astype(sdt), count)
  src = y if y_m is None else y_m
  z = src.reshape((groups, src.shape[0] // groups) + src.shape[1:]).astype(sdt)
  z = (z * _per_group(mul) + _per_group(add)).reshape(src.shape).astype(y.dtype)
  # The barrier keeps the tap and y there as the forward's outputs: without it XLA
  # stored the nine taps' comparisons instead (0.46 GB) and re-read y in the backward.
  pooled, idx, y_at = lax.optimization_barrier(
      _relu_argmax_pool(z, y) if y_m is None else
      _relu_argmax_pool_in_margin(z, y_m, *y.shape[1:3]))
  return (pooled, mean, var), (idx, y_at, y, s1, s2, scale, bias)


def _bn_pool_bwd(groups, res, cts):
  g, g_mean, g_var = cts
  idx, y_at, y, s1, s2, scale, bias = res
  b, h, w, c = y.shape
  sdt = s1.dtype
  count = (b // groups) * h * w
  classes = stem_grad_form() == "classes"
  ho, wo = g.shape[1:3]
  if not classes:
    # g and the taps padded by one pooled row and column, for _pool_bn_grad; the sums
    # read g from the padded copy too, so that g itself has no reader but the pad
    # (which XLA then writes in the kernel that computes g).
    gpad, ipad = _pad_next_window(g, idx)
    g = gpad[:, :ho, :wo]
  # A window sends its gradient to one input (idx < 9) or nowhere: the dense gradient's
  # sums are the pooled grid's, in one reduction with two outputs.
  gf = jnp.where(idx < 9, g.astype(sdt), jnp.zeros((), sdt))
  grouped = lambda v: v.reshape((groups, b // groups) + v.shape[1:])
  gg = grouped(gf)
  zero = jnp.zeros((), sdt)
  d_add, d_mul = lax.reduce((gg, gg * grouped(y_at).astype(sdt)), (zero, zero),
                            lambda p, q: (p[0] + q[0], p[1] + q[1]), (1, 2, 3))
  (mul, _, _, _), moments_vjp = jax.vjp(
      lambda *a: _bn_moments(*a, count), s1, s2, scale.astype(sdt), bias.astype(sdt))
  d_s1, d_s2, d_scale, d_bias = moments_vjp((d_mul, d_add, g_mean, g_var))
  if classes:
    dy = _pool_classes_bn_grad(idx, gf, y, mul, d_s1, d_s2, groups)
  else:
    dy = _pool_bn_grad(ipad, gpad, y, mul, d_s1, d_s2, groups)
  return dy, d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def conv_bn_relu_max_pool_3x3_s2(x, kernel, scale, bias, strides: int = 2,
                                 space_to_depth: bool = False, groups: int = 1):
  """:func:`stem_conv` of ``x`` then :func:`bn_relu_max_pool_3x3_s2`, as one operation
  (QLHS_STEM_TAPS=margin, the default): ``(pooled, mean, var)``. The convolution writes
  its output with a margin (:data:`_STEM_MARGIN`: one row and column more on each side),
  BatchNorm's statistics are those of the image inside it, and each of the pool's nine
  taps is a strided slice of the normalised output, the margin's positions masked out.
  The same values as the convolution then :func:`bn_relu_max_pool_3x3_s2`; the
  kernel's gradient is the plain convolution's.

  Why: the -inf padding of :func:`bn_relu_max_pool_3x3_s2` is a pad inside the pool's
  kernel, and XLA loads every tap of a pad with a bounds check: 939 instructions a
  thread, 72 registers and an issue floor of 0.36 ms on an H100 against 0.22 ms to copy
  its bytes (the pool's forward ran 0.47 ms on the H200, 1.2 TB/s). From the margin:
  545 instructions, 48 registers, a floor of 0.21 ms, under its copy time
  (``python -m qlhs_jax.benchmarks.xla_floors``; benchmarks/NOTES.md, experiment 35;
  not yet timed). The margin costs the convolution 3.6% more outputs at 224 px.
  """
  return _conv_bn_pool_fwd(x, kernel, scale, bias, strides, space_to_depth, groups)[0]


def _conv_out(x, kernel, strides):
  """The (h, w) of :func:`stem_conv`'s output without a margin."""
  return tuple((n + 2 * (k // 2) - k) // strides + 1
               for n, k in zip(x.shape[1:3], kernel.shape[:2]))


def _conv_bn_pool_fwd(x, kernel, scale, bias, strides, space_to_depth, groups):
  h, w = _conv_out(x, kernel, strides)
  y_m = stem_conv(x, kernel, strides, space_to_depth, _STEM_MARGIN)
  out, res = _bn_pool_fwd(y_m[:, 1:h + 1, 1:w + 1], scale, bias, groups, y_m)
  return out, (x, kernel, res)


def _conv_bn_pool_bwd(strides, space_to_depth, groups, res, cts):
  x, kernel, res = res
  dy, d_scale, d_bias = _bn_pool_bwd(groups, res, cts)
  # The margin's outputs take no gradient: the plain convolution's transpose.
  _, conv_vjp = jax.vjp(lambda x, k: stem_conv(x, k, strides, space_to_depth), x, kernel)
  dx, dk = conv_vjp(dy)
  return dx, dk, d_scale, d_bias


conv_bn_relu_max_pool_3x3_s2.defvjp(_conv_bn_pool_fwd, _conv_bn_pool_bwd)


def _by_parity(y, ho, wo):
  """``y`` (B, H, W, C) as (B, Ho, 2, Wo, 2, C): input pixel (2a + py, 2b + px) at (a, py,
  b, px), zero-padded up to 2 Ho x 2 Wo; its class (py, px) is ``[:, :, py, :, px]``."""
  b, h, w, c = y.shape
  return jnp.pad(y, ((0, 0), (0, 2 * ho - h), (0, 2 * wo - w), (0, 0))).reshape(
      b, ho, 2, wo, 2, c)


def _pool_classes_bn_grad(idx, gf, y, mul, d_s1, d_s2, groups):
  """The stem's dL/dy by parity class (:func:`_pool_grad_classes`, ``gf`` the masked
  float32 gradient), each on the pooled grid with y's class y[:, py::2, px::2], then
  interleaved by a stack (:func:`_interleave_classes`): QLHS_STEM_GRAD=classes, the form
  until 2026-12-05."""
  b, h, w, c = y.shape
  ho, wo = gf.shape[1:3]
  sdt = gf.dtype
  grouped = lambda v: v.reshape((groups, b // groups) + v.shape[1:])
  y6 = _by_parity(y, ho, wo)
  classes = {}
  for (py, px), g_class in _pool_grad_classes(idx, gf).items():
    y_class = grouped(y6[:, :, py, :, px, :]).astype(sdt)
    dy = (grouped(g_class) * _per_group(mul) + _per_group(d_s1)
          + 2 * y_class * _per_group(d_s2))
    classes[py, px] = dy.reshape(g_class.shape).astype(y.dtype)
  return _interleave_classes(classes, h, w)


# For an input row (or column) of parity p, the tap of window a + i that reaches it: an
# even row 2a takes tap 1 of window a alone, an odd row 2a + 1 tap 2 of window a and tap 0
# of window a + 1 (:func:`_pool_grad_classes`); -1: none.
_PARITY_TAPS = ((1, -1), (2, 0))


def _pad_next_window(g, idx):
  """``(g, idx)`` padded by one pooled row and column at the end (g with 0, the tap with
  9, "none"), behind a barrier, for :func:`_pool_bn_grad`."""
  pads = ((0, 0), (0, 1), (0, 1), (0, 0))
  return lax.optimization_barrier(
      (jnp.pad(g, pads), jnp.pad(idx, pads, constant_values=9)))


def _pool_bn_grad(ipad, gpad, y, mul, d_s1, d_s2, groups):
  """The stem's dL/dy = G * mul + dL/ds1 + 2 y dL/ds2 (per group), G the pool's input
  gradient, as one element-wise pass over the input grid viewed as (B, Ho, 2, Wo, 2, C):
  the same terms in the same order as :func:`_pool_grad_classes` sums them, each parity
  class's taps as an int8 constant broadcast over (2, 2). ``ipad`` and ``gpad``: the
  window's tap and gradient, padded by :func:`_pad_next_window`.

  Why not the classes and a stack (QLHS_STEM_GRAD=classes, the form until
  2026-12-05): XLA emits the stack as a concatenate kernel that branches per class and
  stores one value at a time, two a thread. The pool backward of stem_pool="argmax",
  the same kind of kernel, ran at 0.635 ms on the H200 for 0.77 GB (1.2 TB/s;
  experiment 23), 2.5x the larger of its issue floor and its copy time. Here the g and
  tap of window a + 1 are read from the padded copies (a pad inside this kernel made
  every read a bounds-checked scalar load), and XLA compiles the pass as a loop fusion
  without branches that writes four channels a thread in one 8-byte store: 229
  instructions a thread, an issue floor of 0.35 ms against 0.33 to copy its bytes on an
  H100 (``python -m qlhs_jax.benchmarks.xla_floors``; benchmarks/NOTES.md, experiment
  34; not yet timed). The same values, bit for bit."""
  b, h, w, c = y.shape
  ho, wo = gpad.shape[1] - 1, gpad.shape[2] - 1
  sdt = mul.dtype
  zero = jnp.zeros((), sdt)
  total = None
  for i in (1, 0):  # ascending taps in every class: the next window's row taps come first
    for j in (1, 0):
      taps = [[3 * _PARITY_TAPS[py][i] + _PARITY_TAPS[px][j]
               if _PARITY_TAPS[py][i] >= 0 and _PARITY_TAPS[px][j] >= 0 else -1
               for px in (0, 1)] for py in (0, 1)]
      t = jnp.asarray(taps, jnp.int8).reshape(1, 1, 2, 1, 2, 1)
      gi = gpad[:, i:i + ho, j:j + wo].astype(sdt)[:, :, None, :, None, :]
      ii = ipad[:, i:i + ho, j:j + wo][:, :, None, :, None, :]
      part = jnp.where(ii == t, gi, zero)
      total = part if total is None else total + part
  y6 = _by_parity(y, ho, wo)
  grouped = lambda v: v.reshape((groups, b // groups) + v.shape[1:])
  vec = lambda v: v.reshape(v.shape[:1] + (1,) * 5 + v.shape[1:])
  dy = (grouped(total) * vec(mul) + vec(d_s1)
        + 2 * grouped(y6).astype(sdt) * vec(d_s2))
  return dy.reshape(b, 2 * ho, 2 * wo, c)[:, :h, :w].astype(y.dtype)


bn_relu_max_pool_3x3_s2.defvjp(_bn_pool_fwd, _bn_pool_bwd)
