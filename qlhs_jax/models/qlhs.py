"""The QLHS network: ResNet50's skeleton with blocks from quasi-linear hyperbolic PDEs.

Specification: ``shared/design/architecture.md`` (copied in spirit into README.md). The
residual stream ``u`` has ``n`` channels; a block expands to ``h = e * n_in`` hidden
channels ``(j, s)`` ordered ``j*e + s``; ``D`` is the 3x3 "derivative" of
:func:`qlhs_jax.models.layers.derivative`. Block forms (output before ``BN_out``):

====== ================================================  =====================================
form   block                                             1x1 maps
====== ================================================  =====================================
eq3    ``A( BN(D u) * (C u) )``                          ``C: n_in->h``, ``A: h->n_out``
eq4    ``(C u) * A( BN(D u) )``                          ``C: n_in->n_out``, ``A: h->n_out``
eq5    ``sum_g BN(D u) * (C u)`` (g = h/n_out copies)    ``C: n_in->h``
eq6    ``A( BN( D( u * BN(C u) ) ) )``                   ``C: n_in->n_in``, ``A: h->n_out``
eq7    ``A( BN( D( u_rep * BN(C u) ) ) )``               ``C: n_in->h``, ``A: h->n_out``
eq3w   ``A( BN(D(W u)) * (C u) )``                       ``W: n_in->n_in`` plus eq3's
====== ================================================  =====================================

``eq3w`` is not in the paper: a 1x1 mixing projection in front of ``D`` makes the block
closed under every invertible change of basis of the stream, so the paper's claimed
``prod_k GL(n_k)`` (``O(n_k)`` with softball/hardball) holds exactly (symmetry.md, 2b).

Stride (first block of stages 2-4): in eq3/eq4/eq5 both factors live on the strided grid
(``D`` strides, the 1x1 maps read ``u[:, ::2, ::2]``); in eq6/eq7/eq3w the product (or
``W u``) is formed at full resolution and ``D`` carries the stride.

``hidden_layout="s_major"`` orders the hidden channels ``s*n_in + j`` instead (D's output
as (..., e, n_in)): the same function with C's output columns, A's input rows and the
hidden BatchNorms permuted (:func:`qlhs_jax.models.layout.convert_hidden_layout` maps
the variables). It is a speed variant: reductions per kernel ``s`` then run over a
contiguous ``j`` axis (benchmarks/NOTES.md, experiment 1).

``fuse_d_bn="xla"`` or ``"pallas"`` computes the training-mode ``BN(D u) * (C u)`` of
eq3, eq5 and eq3w through :func:`qlhs_jax.kernels.d_bn_product` (hand-written backward,
D u never stored; Pallas kernels on GPU), with the same variables; ``"none"`` is plain
autodiff. Evaluation and folded models always take the plain path. ``"auto"`` is "xla"
where its reductions run as Pallas kernels (NVIDIA GPUs: ``kernels.stencil``, 1.29x
the plain path's training img/s on the H100) and "none" elsewhere; configs/eq3.py sets
it.

``fuse_d_bn="block"`` (eq3) goes further: the two 1x1 maps run inside the Pallas kernels
too (:mod:`qlhs_jax.kernels.eq3_block`), so no hidden tensor is stored in the forward
(with BatchNorm groups a block takes "xla"). ``block_max_width=N`` (0: no limit) keeps
the kernels to blocks whose input stream has at most N channels; wider blocks take
"xla". Why: each tile of the kernels re-reads both 1x1 weight matrices (16 n^2 bytes)
for at most 8,192/n pixels, so that on-chip traffic grows as n^3 per pixel
(``python -m qlhs_jax.benchmarks.block_tune --l2``; benchmarks/NOTES.md, experiment 9).

``pin_hidden_layout=True`` keeps D's output in the row-major layout its shape names
(:func:`qlhs_jax.models.layers.pin_row_major`): a speed variant for XLA on GPU, same
numbers, same variables.

Then ``y = BN_out(block) + shortcut(u)`` (``BN_out`` scale starts at 0, so every block
starts as the identity), followed by the activation where the placement puts one.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qlhs_jax.kernels import d_bn_product as dbn
from qlhs_jax.kernels import eq3_block
from qlhs_jax.models import layers
from qlhs_jax.models.common import (BN_EPS, BatchNorm, ConvNorm, Dtype, classifier_head,
                                    conv_init, global_pool, resnet_stem,
                                    update_running_stats)

FORMS = ("eq3", "eq4", "eq5", "eq6", "eq7", "eq3w")
# Rematerialisation of each block in the backward pass (performance only; same numbers):
# "none" keeps what XLA saves; "dots" keeps only the 1x1 (matmul) outputs and recomputes
# D, BN and the products, which are cheap element-wise work on a memory-bound model;
# "full" keeps only the block input.
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}
PLACEMENTS = ("ds", "all")
HIDDEN_LAYOUTS = layers.HIDDEN_LAYOUTS
# "block" (eq3 only): the whole hidden path of each block, A(BN(D u) * (C u)), as Pallas
# kernels with the 1x1 matmuls inside (kernels/eq3_block.py); a block with BatchNorm
# groups takes "xla".
FUSE_D_BN = dbn.FUSE_IMPLS + ("block", "auto")
FUSED_FORMS = ("eq3", "eq5", "eq3w")  # the forms whose block holds BN(D u) * (C u)


def d_kernel_init(expansion: int):
  """He-normal with fan_out = 9 * e: the paper's ws kernel is ``Conv2d(1, e, 3)``.

  For per-channel kernels we keep the same per-group fan-out (PyTorch would count all
  ``h`` outputs of the depthwise conv, a 1/sqrt(n) smaller start); a deliberate choice,
  so that ws and no-ws start from kernels of one scale."""
  return nn.initializers.normal(stddev=(2.0 / (9 * expansion)) ** 0.5)


def _bn_d_variables(module: nn.Module, h: int):
  """The plain path's ``bn_d`` BatchNorm variables (``scale``, ``bias``; running ``mean``
  and ``var``), so that checkpoints do not depend on ``fuse_d_bn``."""
  scale = module.param("scale", nn.initializers.ones, (h,), module.param_dtype)
  bias = module.param("bias", nn.initializers.zeros, (h,), module.param_dtype)
  sdt = jnp.promote_types(module.param_dtype, jnp.float32)
  ra_mean = module.variable("batch_stats", "mean", lambda: jnp.zeros((h,), sdt))
  ra_var = module.variable("batch_stats", "var", lambda: jnp.ones((h,), sdt))
  return scale, bias, ra_mean, ra_var


def _pallas_interpret(impl: str) -> bool:
  """Whether fuse_d_bn ``impl``'s Pallas kernels run interpreted (on a CPU):
  ``d_bn_product.pallas_interpret``."""
  return dbn.pallas_interpret(f"fuse_d_bn={impl!r}", "use fuse_d_bn='xla'")


class FusedDBNProduct(nn.Module):
  """Training-mode ``BN(D u) * c`` as one operation (qlhs_jax.kernels.d_bn_product),
  with the variables of the plain path's ``bn_d``. ``c_weights``: ``c`` is C's weight
  and the operation makes c = C u itself (``d_bn_product.c_form``). ``a``: the weight of
  the 1x1 map A that follows, which the operation then applies, returning y = A p
  (``d_bn_product.dp_form``). ``through``: returns ``(y, u)``, u handed back by the
  operation for the block's shortcut (``d_bn_product.du_sum``)."""
  impl: str
  stride: int = 1
  groups: int = 1
  param_dtype: Dtype = jnp.float32
  c_weights: bool = False
  through: bool = False

  @nn.compact
  def __call__(self, u, kernel, c, a=None):
    scale, bias, ra_mean, ra_var = _bn_d_variables(self, c.shape[-1])
    interpret = _pallas_interpret(self.impl) if self.impl == "pallas" else False
    y, mean, var, *u_back = dbn.d_bn_product(
        u, c, kernel, scale, bias, stride=self.stride, groups=self.groups, eps=BN_EPS,
        impl=self.impl, interpret=interpret, c_weights=self.c_weights, a=a,
        through=self.through)
    if not self.is_initializing():
      count = (u.shape[0] // self.groups) * y.shape[1] * y.shape[2]
      update_running_stats(ra_mean, ra_var, mean, var, count)
    return (y, *u_back) if self.through else y


class FusedEq3Hidden(nn.Module):
  """Training-mode ``A(BN(D u) * (C u))`` of an eq3 block as one operation
  (qlhs_jax.kernels.eq3_block: the two 1x1 matmuls inside Pallas kernels), with the
  variables of the plain path's ``bn_d``; C and A stay the block's parameters."""
  stride: int = 1
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, u, kernel, cw, aw):
    scale, bias, ra_mean, ra_var = _bn_d_variables(self, cw.shape[-1])
    y, mean, var = eq3_block.eq3_hidden(u, cw, aw, kernel, scale, bias, stride=self.stride,
                                        eps=BN_EPS, interpret=_pallas_interpret("block"))
    if not self.is_initializing():
      update_running_stats(ra_mean, ra_var, mean, var, y.shape[0] * y.shape[1] * y.shape[2])
    return y


class QLHSBlock(nn.Module):
  """One residual block of the given ``form`` (see the module docstring)."""
  n_out: int
  stride: int = 1
  form: str = "eq3"
  expansion: int = 4
  weight_sharing: bool = True
  eq6_c_norm: bool = True
  post_activation: str = "none"
  d_impl: str = "shifted"
  train: bool = False
  hidden_layout: str = "j_major"
  fuse_d_bn: str = "none"
  block_max_width: int = 0
  pin_hidden_layout: bool = False
  folded: bool = False
  bn_groups: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  # The helpers below run inside __call__'s scope and are marked nn.nowrap: wrapped as
  # module methods, each call would be recorded by nn.tabulate, which tries to read
  # their arguments (a lambda, parameter names) as arrays and warns.
  @nn.nowrap
  def _dense(self, x, name, n_out):
    """A bias-free 1x1 map ``x @ W``, ``W`` of shape (in, out)."""
    return jnp.dot(x, self._dense_weight(name, x.shape[-1], n_out))

  @nn.nowrap
  def _dense_weight(self, name, n_in, n_out):
    """The weight ``W`` (n_in, n_out) of the 1x1 map ``name`` (:meth:`_dense`'s), in the
    compute dtype: for the fused paths that take the weight instead of the map's
    output, the same variable with the same initial value."""
    return self.param(name, conv_init, (n_in, n_out), self.param_dtype).astype(self.dtype)

  @nn.nowrap
  def _norm(self, x, name, zero_init=False):
    """BatchNorm in training form; a bias ``{name}_bias`` once folded (the BN's scale
    then lives in the neighbouring map, see fold.py)."""
    if self.folded:
      return x + self.param(f"{name}_bias", nn.initializers.zeros, (x.shape[-1],),
                            self.param_dtype).astype(self.dtype)
    init = nn.initializers.zeros if zero_init else nn.initializers.ones
    return BatchNorm(use_running_average=not self.train, groups=self.bn_groups,
                     scale_init=init, dtype=self.dtype, param_dtype=self.param_dtype,
                     name=f"bn_{name}")(x)

  @property
  def _smaj(self):
    return self.hidden_layout == "s_major"

  @nn.nowrap
  def _split(self, x):
    """``x`` (..., n) as D's rank-5 input: (..., n, 1), or (..., 1, n) in s_major."""
    return x[..., None, :] if self._smaj else x[..., None]

  @nn.nowrap
  def _d_kernel(self, j):
    """D's kernel (3, 3, 1 or j, e). Folded: always per channel."""
    e = self.expansion
    kj = 1 if (self.weight_sharing and not self.folded) else j
    return self.param("d_kernel", d_kernel_init(e), (3, 3, kj, e), self.param_dtype)

  @nn.nowrap
  def _d(self, x5, stride):
    """D on ``x5`` (B, H, W, J, S) (s_major: (B, H, W, S, J))."""
    kernel = self._d_kernel(x5.shape[4 if self._smaj else 3])
    return layers.derivative(x5, kernel, stride, self.d_impl, self.hidden_layout,
                             pin=self.pin_hidden_layout)

  @nn.nowrap
  def _d_bn_times(self, x, make_c, stride, c_of_x=False, then_a=False, through=False):
    """``(BN_d(D x) * c, x)`` (x: (B, H, W, n) stream, c = make_c() hidden): fused when
    configured. ``make_c`` runs after D's kernel exists, keeping the parameter creation
    order (and so the initial values) of the plain path. ``c_of_x``: c is the 1x1 map
    "c" of x subsampled at ``stride``, which the fused operation may make itself
    (``d_bn_product.c_form``, QLHS_C_FORM=kernels), taking the map's weight instead.
    ``then_a``: the 1x1 map "a" (to n_out channels) follows, y = A(BN_d(D x) * c) is
    returned, and the fused operation may apply it itself (``d_bn_product.dp_form``,
    QLHS_DP_FORM=kernels: its backward then makes dp = dy A^T in its kernels).
    ``through``: x is the block's shortcut too; the x returned is then the fused
    operation's, where QLHS_DU_SUM=kernel has it hand x back (``d_bn_product.du_sum``),
    so that the shortcut's gradient is added in du's kernel."""
    fuse = self._fuse(x.shape[-1])
    a_map = lambda p: self._dense(p, "a", self.n_out) if then_a else p
    if not self._fuses_hidden(x.shape[-1]):
      return a_map(self._norm(self._d(self._split(x), stride), "d") * make_c()), x
    kernel = self._d_kernel(x.shape[-1])
    impl = "xla" if fuse == "block" else fuse
    n, h = x.shape[-1], self.expansion * x.shape[-1]
    c_weights = c_of_x and impl == "xla" and dbn.c_form() != "stored"
    applies_a = then_a and impl == "xla" and dbn.dp_form() != "stored"
    # The parameters _dense would create, in the same order (c, then a).
    c = self._dense_weight("c", n, h) if c_weights else make_c()
    aw = self._dense_weight("a", h, self.n_out) if applies_a else None
    through = through and impl == "xla" and dbn.du_sum() == "kernel"
    out = FusedDBNProduct(impl, stride, self.bn_groups, self.param_dtype,
                          c_weights=c_weights, through=through, name="bn_d")(
                              x, kernel, c, aw)
    y, x = out if through else (out, x)
    return (y if applies_a else a_map(y)), x

  @nn.nowrap
  def _fuses_hidden(self, n_in) -> bool:
    """Whether the hidden path runs fused (``fuse_d_bn`` not "none", training, not
    folded): D + BN + product, or "block"'s kernels."""
    return self._fuse(n_in) != "none" and self.train and not self.folded

  @nn.nowrap
  def _fuse(self, n_in):
    """fuse_d_bn for a block of ``n_in`` input channels. "auto": "xla" where its
    reductions run as Pallas kernels (``d_bn_product.stencil_on_gpu``: NVIDIA GPUs, one
    or, in ``steps.jit_train_step``, several with per-replica BatchNorm; on the H100
    1.29x the plain path's img/s, benchmarks/NOTES.md experiment 13), else
    "none" (with XLA's reductions "xla" trains slower than the plain path: 0.46x on the
    H100); "none" too where fusing does not apply (other forms, the s-major layout)."""
    if self.fuse_d_bn != "auto":
      return self.fuse_d_bn
    applies = self.form in FUSED_FORMS and not self._smaj
    return ("xla" if applies and dbn.stencil_on_gpu(n_in, self.bn_groups, self.expansion)
            else "none")

  @nn.nowrap
  def _check_fuse(self):
    if self.fuse_d_bn not in FUSE_D_BN:
      raise ValueError(f"unknown fuse_d_bn {self.fuse_d_bn!r}; choose one of {FUSE_D_BN}")
    # block_max_width limits "block" only; refused elsewhere, so that a run does not
    # silently take another path than the one asked for.
    width = self.block_max_width
    if not isinstance(width, int) or width < 0:
      raise ValueError(f"block_max_width={width!r}: want an input width in channels, or 0 "
                       f"for no limit")
    if width and self.fuse_d_bn != "block":
      raise ValueError(f"block_max_width={width} limits fuse_d_bn='block', but fuse_d_bn is "
                       f"{self.fuse_d_bn!r}; set fuse_d_bn=block or leave block_max_width "
                       f"at 0")
    if self.fuse_d_bn in ("none", "auto"):  # auto never picks what does not apply
      return
    if self.form not in FUSED_FORMS:
      raise ValueError(f"fuse_d_bn={self.fuse_d_bn!r} applies to the forms {FUSED_FORMS} "
                       f"(BN(D u) * (C u)), not {self.form!r}; use fuse_d_bn='none'")
    if self._smaj:
      raise ValueError(f"fuse_d_bn={self.fuse_d_bn!r} works on the j_major hidden "
                       "layout; use hidden_layout='j_major' (the default)")
    if self.fuse_d_bn == "pallas":
      dbn.check_pallas(self.expansion)
    if self.fuse_d_bn == "block" and self.form != "eq3":
      raise ValueError(f"fuse_d_bn='block' fuses eq3's two 1x1 maps into its kernels; "
                       f"form {self.form!r} takes fuse_d_bn='xla' or 'pallas'")

  @nn.nowrap
  def _fuses_block(self, n_in):
    """Whether this block's hidden path runs as eq3_block's kernels (fuse_d_bn="block",
    training, one BatchNorm group, input width within block_max_width); otherwise a
    "block" model's block takes "xla"."""
    return (self.fuse_d_bn == "block" and self._fuses_hidden(n_in)
            and self.bn_groups == 1
            and (self.block_max_width == 0 or n_in <= self.block_max_width))

  @nn.nowrap
  def _eq3_fused_hidden(self, u):
    """``A(BN(D u) * (C u))`` through eq3_block, creating d_kernel, c and a in the plain
    path's order (same initial values)."""
    n_in, h = u.shape[-1], self.expansion * u.shape[-1]
    kernel = self._d_kernel(n_in)
    cw = self._dense_weight("c", n_in, h)
    aw = self._dense_weight("a", h, self.n_out)
    return FusedEq3Hidden(self.stride, self.param_dtype, name="bn_d")(
        u.astype(self.dtype), kernel, cw, aw)

  @nn.nowrap
  def _group_sum(self, p, n_in):
    """Eq.(5): output o sums the hidden channels (j, s) with (j*e + s) // g == o,
    g = h / n_out, in either layout (the j-major layout's contiguous groups)."""
    e, n_out = self.expansion, self.n_out
    h = e * n_in
    g = h // n_out
    lead = p.shape[:-1]
    if not self._smaj:
      return p.reshape(lead + (n_out, g)).sum(-1)
    pe = p.reshape(lead + (e, n_in))  # (s, j)
    if e % g == 0:  # each group: g consecutive s of one j; o = j*(e//g) + s//g
      r = e // g
      y = pe.reshape(lead + (r, g, n_in)).sum(-2)  # (s//g, j)
      return jnp.swapaxes(y, -1, -2).reshape(lead + (n_out,))  # small: n_out channels
    if g % e == 0:  # each group: all s of g//e consecutive j; o = j // (g//e)
      return pe.reshape(lead + (e, n_out, g // e)).sum((-3, -1))
    # Groups that split a j's kernels unevenly: back to j-major (a full transpose).
    pj = jnp.swapaxes(pe, -1, -2).reshape(lead + (h,))
    return pj.reshape(lead + (n_out, g)).sum(-1)

  @nn.compact
  def __call__(self, u):
    n_in, e, s = u.shape[-1], self.expansion, self.stride
    h = e * n_in
    form = self.form
    if self.hidden_layout not in HIDDEN_LAYOUTS:
      raise ValueError(f"unknown hidden_layout {self.hidden_layout!r}; "
                       f"choose one of {HIDDEN_LAYOUTS}")
    self._check_fuse()
    us = layers.subsample(u, s)
    # The shortcut is u itself; _d_bn_times may then give u back as the fused
    # operation hands it back (its ``through``), and the shortcut takes that.
    identity = s == 1 and n_in == self.n_out
    if form == "eq3" and self._fuses_block(n_in):
      y = self._eq3_fused_hidden(u)
    elif form == "eq3":
      y, u = self._d_bn_times(u, lambda: self._dense(us, "c", h), s, True, then_a=True,
                              through=identity)
    elif form == "eq3w":
      wu = self._dense(u, "w", n_in)
      y, _ = self._d_bn_times(wu, lambda: self._dense(us, "c", h), s, then_a=True)
    elif form == "eq4":
      f1 = self._norm(self._d(self._split(u), s), "d")
      y = self._dense(us, "c", self.n_out) * self._dense(f1, "a", self.n_out)
    elif form == "eq5":
      if h % self.n_out:
        raise ValueError(f"eq5 needs h = e*n_in = {h} to divide by n_out = {self.n_out}")
      p, u = self._d_bn_times(u, lambda: self._dense(us, "c", h), s, True,
                              through=identity)
      # Group g of output o is hidden channel o*g + t (j-major), i.e. (j, s) with
      # j = o*g//e: the non-strided block sums exactly the e derivatives of u_o, as
      # Eq.(5) says. s_major sums the same (j, s) sets.
      y = self._group_sum(p, n_in)
    elif form == "eq6":
      c = self._dense(u, "c", n_in)
      if self.eq6_c_norm:
        c = self._norm(c, "c")
      f = self._norm(self._d(self._split(u * c), s), "d")
      y = self._dense(f, "a", self.n_out)
    elif form == "eq7":
      c = self._norm(self._dense(u, "c", h), "c")
      if self._smaj:  # c's channels are s*n_in + j
        p = u[..., None, :] * c.reshape(c.shape[:-1] + (e, n_in))
      else:  # u repeated e times
        p = u[..., None] * c.reshape(c.shape[:-1] + (n_in, e))
      f = self._norm(self._d(p, s), "d")
      y = self._dense(f, "a", self.n_out)
    else:
      raise ValueError(f"unknown block form {form!r}; choose one of {FORMS}")
    y = self._norm(y, "out", zero_init=True)
    if not identity:
      # The 1x1 shortcut at stride s, on the strided u that C reads too. XLA's dot
      # merger computes the two as one matmul; where C then goes to the fused D + BN +
      # product, whose kernels take C as an operand of its own, C was copied out of
      # that matmul's output. The barrier keeps the two matmuls apart there: 1.24 GB
      # less a step at batch 256 (deviceless; the plain path gains from the merge, 3.1
      # GB; benchmarks/NOTES.md, experiment 26). It changes no value.
      shortcut = ConvNorm(self.n_out, (1, 1), 1, folded=self.folded, train=self.train,
                          bn_groups=self.bn_groups, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="shortcut")(
                              jax.lax.optimization_barrier(us) if self._fuses_hidden(n_in)
                              else us)
    else:
      shortcut = u
    return layers.activation(y + shortcut.astype(y.dtype), self.post_activation)


class QLHSNet(nn.Module):
  """ResNet50-shaped QLHS network (architecture.md). NHWC input, float32 logits.

  ``placement="ds"``: the activation follows the residual add of the first block of
  stages 2-4 and once more before the global pool. ``"all"``: after every block; the
  last block's activation is the one before the pool (it is not applied twice; the
  paper's only @all row uses ReLU, for which the two readings agree). The block list
  with each block's activation is :meth:`block_layout`.
  ``stem="small"`` (3x3 stride-1 conv, no max-pool) is for tiny images (quickstart,
  tests); the paper's stem is ``"imagenet"``.
  """
  form: str = "eq3"
  expansion: int = 4
  weight_sharing: bool = True
  activation: str = "softball"
  placement: str = "ds"
  widths: Sequence[int] = (64, 128, 256, 512)
  depths: Sequence[int] = (3, 4, 6, 3)
  num_classes: int = 100
  stem: str = "imagenet"
  stem_pool: str = "argmax_bn"
  stem_pad_channels: int = 4
  stem_conv: str = "space_to_depth"
  eq6_c_norm: bool = True
  d_impl: str = "shifted"
  remat: str = "none"
  hidden_layout: str = "j_major"
  fuse_d_bn: str = "none"
  block_max_width: int = 0
  pin_hidden_layout: bool = False
  folded: bool = False
  bn_groups: int = 1
  dtype: Dtype = jnp.bfloat16
  param_dtype: Dtype = jnp.float32

  def block_layout(self):
    """``[(stage, index, n_in, n_out, stride, post_activation)]`` for every block."""
    if self.placement not in PLACEMENTS:
      raise ValueError(f"unknown placement {self.placement!r}; choose one of {PLACEMENTS}")
    if self.activation not in layers.ACTIVATIONS:
      raise ValueError(f"unknown activation {self.activation!r}; "
                       f"choose one of {layers.ACTIVATIONS}")
    if len(self.widths) != len(self.depths):
      raise ValueError(f"widths {self.widths} and depths {self.depths} differ in length")
    out, n_in = [], self.widths[0]
    for k, (width, depth) in enumerate(zip(self.widths, self.depths)):
      for i in range(depth):
        stride = 2 if (k > 0 and i == 0) else 1
        act = self.activation if (self.placement == "all" or (k > 0 and i == 0)) else "none"
        out.append((k, i, n_in, width, stride, act))
        n_in = width
    return out

  @nn.compact
  def __call__(self, x, train: bool = False):
    common = dict(folded=self.folded, train=train, bn_groups=self.bn_groups,
                  dtype=self.dtype, param_dtype=self.param_dtype)
    x = resnet_stem(x.astype(self.dtype), self.widths[0], self.stem, common,
                    self.stem_pool, self.stem_pad_channels, self.stem_conv)
    layout = self.block_layout()
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"unknown remat {self.remat!r}; choose one of {list(REMAT_POLICIES)}")
    block_cls = QLHSBlock
    if self.remat != "none" and train and not self.folded:
      block_cls = nn.remat(QLHSBlock, policy=REMAT_POLICIES[self.remat])
    for k, i, _, n_out, stride, act in layout:
      x = block_cls(n_out, stride, self.form, self.expansion, self.weight_sharing,
                    self.eq6_c_norm, act, self.d_impl, hidden_layout=self.hidden_layout,
                    fuse_d_bn=self.fuse_d_bn, block_max_width=self.block_max_width,
                    pin_hidden_layout=self.pin_hidden_layout,
                    name=f"stage{k + 1}_block{i}", **common)(x)
    if self.placement == "ds":  # the fourth activation, before pooling
      x = layers.activation(x, self.activation)
    return classifier_head(global_pool(x), self.num_classes, self.param_dtype)
