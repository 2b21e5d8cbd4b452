"""Eq.(3)'s whole hidden path ``y = A( BN(D u) * (C u) )`` in three Pallas kernels.

Why: ``fuse_d_bn="xla"`` brings a stage-1 block to 8.6 GB per step at batch 256, and
that is XLA's floor (benchmarks/NOTES.md, experiment 7): XLA's GEMM fusions take no
operand the size of the hidden tensor, so q = C u, p = BN(D u) * q and dq are each
stored between a cuBLAS/Triton matmul and an element-wise kernel. Here the two 1x1
matmuls run inside the kernels (Triton ``dot`` on the tensor cores), so no hidden
tensor is stored in the forward and one (dx, for du = D^T dx) in the backward:

=========  ====================================================  =====================
pass       work (per tile of pixels, per (channel block, s))     HBM traffic
=========  ====================================================  =====================
stats      sums of D u, (D u)^2 from u's tap Gram matrix (XLA;   u
           ``stencil.tap_stats`` with QLHS_STATS_FORM=pallas)
forward    q = u C_s, D u, p = (D u * mul + add) * q; y += p A_s  u in, y out
sums       recompute q, D u, p; dp = dy A_s^T; BatchNorm sums,   u, dy in
           dL/dkernel's tap sums, dA_s += p^T dy, dC_s += u^T dq
dx         recompute q, D u, dp; dx (stored); du1 += dq C_s^T    u, dy in; dx, du1 out
du         du = D^T dx + du1 (XLA, ``d_bn_product._d_transpose``;  dx, du1 in; du out
           ``stencil.d_transpose`` with QLHS_DU_FORM=pallas)
=========  ====================================================  =====================

Compiled for an H100 (``benchmarks.aot``, deviceless), a stage-1 block at batch 256 moves
2.9 GB per step here against 8.6 GB with "xla", the BatchNorm after A and the residual
included (benchmarks/NOTES.md, experiment 8). The price is arithmetic: the forward's two
matmuls are done three times (each kernel recomputes q and dp), ~1.5x the blocks' matmul
FLOPs, on a step with ~10x headroom on an H100 (NOTES, "Two numbers first").

Scope: any stride (Eq.(3)'s strided blocks: D strides and the 1x1 maps read
``u[:, ::s, ::s]``), one BatchNorm group (the model sends blocks with groups to
``d_bn_product(impl="xla")``), j-major hidden channels, a power-of-two ``e``,
power-of-two ``n`` and ``n_out`` of at least 16 (Triton's block shapes and ``dot``).
Statistics, the kernel gradient's algebra and the BatchNorm backward are
``d_bn_product``'s ("xla" path), so the two paths differ only in where the matmuls run
and in float32 rounding: q and dp are rounded to the compute dtype before use, as the
model's matmul outputs are.

Pixels are flattened to rows ``(B*H*W, n)``. Each output pixel of a tile loads its
nine taps as rows of channels at computed row indices (with stride 1 the tile's rows
shifted by ``dy*W + dx``), clamped into u and masked where the tap leaves the image, so
u is read as it is (no padded copy). Weights are
permuted once per step into per-``s`` slices (``C_s[i, j] = C[i, j*e + s]``,
``A_s[j, o] = A[j*e + s, o]``), so each kernel works on 2-D tiles only.

``interpret=True`` runs the kernels on any backend (the CPU tests check them against
float64 autodiff of the plain formula). Tiling: ``QLHS_BLOCK_TILING="pixels,warps"``
for every kernel, with entries per kernel and block shape after it (see ``tiling``;
``benchmarks.block_tune`` times them on the GPU and prints the fastest); default
:data:`DEFAULT_TILING`. On the H100 the model with these kernels trains at 1,605
img/s, 0.36x the plain path's 4,489 from an earlier H100 run (benchmarks/NOTES.md,
experiment 11).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from qlhs_jax.kernels import d_bn_product as dbn
from qlhs_jax.kernels import settings

F32 = jnp.float32
# (pixels per tile, warps): of (64, 4), (64, 8), (32, 4) and (128, 8), compiled for an
# H100 with `benchmarks.triton_compile --op eq3_block`, (64, 8) spills least (0.8 KB a
# thread in stage 1's sums kernel, <= 32 B elsewhere). (32, 8) spills nothing at stages
# 1-2 but doubles the forward and dx kernels' weight reloads (one per tile; NOTES,
# experiment 9). Timed on the H100 at stages 1-2 only (NOTES, experiment 11): 4 warps
# beat 8 for every kernel there (the sums kernel 3x at stage 1 with 32,4,64); the
# default stays until stages 3-4, where 4 warps spill more, are timed too.
# benchmarks.block_tune picks per kernel and shape on the GPU. Wider streams get fewer
# pixels per tile (see _plan).
DEFAULT_TILING = (64, 8)
# Float32 values a program's accumulator tile may hold: (pixels, n_out) in the forward,
# (pixels, n) in the dx pass; (bj, n + n_out) in the sums pass, SUMS_ACC_VALUES.
ACC_VALUES = 8192
SUMS_ACC_VALUES = 4096
# Programs the sums pass aims for: ~8 per SM of an H100 (132 SMs).
SUMS_PROGRAMS = 1056
# Input channels per step of the forward's and the dx pass's channel loop.
FORWARD_BJ = 64


KERNELS = ("forward", "sums", "dx")
_SHAPE_KEY = re.compile(r"\d+x\d+x\d+x\d+s\d+$")
_TILING_HELP = ("want whitespace-separated '[SCOPE=]pixels,warps[,channels]' entries, e.g. "
                "'64,8' or '64,8 sums=32,8,32 dx@56x56x64x64s1=128,8' (pixels a power of "
                "two >= 16, warps 1-16; channels, the sums kernel's hidden channels per "
                "slice, a power of two >= 16, not in a forward or dx entry; SCOPE a "
                "kernel (forward, sums, dx), a block shape HxWxNxN_OUTsSTRIDE, or "
                "kernel@shape)")


def shape_key(h: int, w: int, n: int, n_out: int, stride: int) -> str:
  """A block shape as QLHS_BLOCK_TILING names it: u's (H, W, n), n_out and the stride."""
  return f"{h}x{w}x{n}x{n_out}s{stride}"


def parse_tiling(raw: str) -> dict[str, tuple[int, ...]]:
  """QLHS_BLOCK_TILING's entries: ``{scope: (pixels, warps[, channels])}``, scope "" for
  the bare entry that applies everywhere."""
  spec = {}
  pow2 = lambda v: v >= 16 and not v & (v - 1)
  for entry in raw.split():
    scope, _, value = entry.rpartition("=")
    try:
      fields = tuple(int(v) for v in value.split(","))
    except ValueError:
      fields = ()
    if "@" in scope:
      kernel, key = scope.split("@", 1)
      scope_ok = kernel in KERNELS and bool(_SHAPE_KEY.match(key))
    else:
      kernel = scope if scope in KERNELS else ""
      scope_ok = not scope or scope in KERNELS or bool(_SHAPE_KEY.match(scope))
    fields_ok = len(fields) in (2, 3) and pow2(fields[0]) and fields[1] in (1, 2, 4, 8, 16)
    if len(fields) == 3:  # the sums kernel's channels per slice
      fields_ok = fields_ok and pow2(fields[2]) and kernel in ("", "sums")
    if not (scope_ok and fields_ok) or scope in spec:
      raise ValueError(f"{settings.name('QLHS_BLOCK_TILING')}={raw!r}: entry {entry!r} "
                       f"is not valid (or repeats a scope); {_TILING_HELP}")
    spec[scope] = fields
  return spec


def tiling(kernel: str | None = None, key: str | None = None) -> tuple[int, ...]:
  """(pixels, warps[, channels]) of one kernel at one block shape (``shape_key``) from
  QLHS_BLOCK_TILING, the most specific entry first (kernel@shape, shape, kernel, the
  bare default), else :data:`DEFAULT_TILING`. Each kernel has its own registers and
  traffic, and the best tile differs by channel count (benchmarks.block_tune finds it
  on the GPU). ``channels`` sets the sums kernel's hidden channels per slice (each
  slice re-reads u and dy); without it, as many as SUMS_ACC_VALUES allows."""
  spec = parse_tiling(settings.get("QLHS_BLOCK_TILING"))
  for scope in (f"{kernel}@{key}", key, kernel, ""):
    if scope is not None and scope in spec:
      return spec[scope]
  return DEFAULT_TILING


def _pow2_floor(x: int) -> int:
  return 1 << (max(1, x).bit_length() - 1)


def _plan(u_shape, n_out: int, e: int, stride: int = 1, kernel: str | None = None,
          tile: tuple[int, ...] | None = None) -> dict:
  """Static tiling of ``kernel`` (one of KERNELS; None: the bare default). ``m`` output
  pixels per tile (a power of two, >= 16, Triton's smallest dot), ``bj`` input channels
  per slice of the sums pass (at most n); tiles are grouped into ``chunks`` of ``tpc``
  consecutive tiles, one program of the sums pass per (slice, chunk). ``tile`` (pixels,
  warps[, channels]) overrides QLHS_BLOCK_TILING (benchmarks.block_tune)."""
  b, h, w, n = u_shape
  m0, warps, *channels = tile or tiling(kernel, shape_key(h, w, n, n_out, stride))
  from qlhs_jax.models.layers import _out_size  # models imports this module
  ho, wo = _out_size(h, stride), _out_size(w, stride)
  rows = b * ho * wo
  m = max(16, min(m0, _pow2_floor(ACC_VALUES // max(n, n_out)),
                  pl.next_power_of_2(rows)))
  bj = min(n, channels[0] if channels else
           max(16, _pow2_floor(SUMS_ACC_VALUES // (n + n_out))))
  tiles = -(-rows // m)
  slices = (n // bj) * e
  chunks = min(tiles, max(1, -(-SUMS_PROGRAMS // slices)))
  tpc = -(-tiles // chunks)
  chunks = -(-tiles // tpc)  # the last chunk's tiles past `tiles` count nothing
  return dict(b=b, h=h, w=w, ho=ho, wo=wo, stride=stride, n=n, e=e, n_out=n_out,
              rows=rows, m=m, bj=bj, bjf=min(n, FORWARD_BJ), tiles=tiles, tpc=tpc,
              chunks=chunks, warps=warps)


def _pad_rows(x2, plan):
  """dy (output rows, c), zero-padded to the tiles' end. At batch 256 the tiles end
  where the rows do, so dy is not copied."""
  end = plan["tiles"] * plan["m"] - plan["rows"]
  return jnp.pad(x2, ((0, end), (0, 0))) if end else x2


def _dot(a, b, ta=False, tb=False):
  """a @ b with float32 accumulation; ``ta``/``tb`` transpose an operand."""
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  prec = lax.Precision.HIGHEST if a.dtype == F32 else None
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=F32)


def _rnd(x, dt):
  """Rounded to the compute dtype and back: a matmul output as the model stores it."""
  return x.astype(dt).astype(F32)


class _Tile:
  """Output row ``p0`` (a multiple of m) of the flattened pixels: tap masks and loads.
  Output pixel (y, x) of the tile reads input pixel (s*y + dy, s*x + dx) for its taps,
  a load of whole rows of channels at computed row indices; indices are clamped into u
  (where the tap is outside the image, or past the last pixel), so u needs no padding,
  and masked. Rows past the last pixel repeat it (their dy is zero, their y dropped).

  A "lean" plan (``kernels.stencil``'s kernels at stride 1, ``stencil.lean_plan``)
  loads a tap instead as the m contiguous rows that start a constant offset from p0,
  with a masked load: no per-row index, clamp or select, and (y, x) come from a
  truncating division of non-negative numbers, without floor division's sign
  corrections. ptxas's count for du = D^T dx at stage 1 fell from 848 instructions a
  warp to 616 that way (benchmarks/NOTES.md, experiment 16)."""

  def __init__(self, p0, plan):
    self.p0, self.plan = p0, plan
    st, h, w = plan["stride"], plan["h"], plan["w"]
    self.lean = plan.get("lean", False)
    if self.lean:
      pix = p0 + lax.broadcasted_iota(jnp.int32, (plan["m"],), 0)
      self.live = pix < plan["rows"]  # rows past the last pixel load nothing
      self.x, self.y = lax.rem(pix, w), lax.rem(lax.div(pix, w), h)
      return
    pix = jnp.minimum(p0 + lax.broadcasted_iota(jnp.int32, (plan["m"],), 0),
                      plan["rows"] - 1)
    self.x = pix % plan["wo"]
    self.y = (pix // plan["wo"]) % plan["ho"]
    # u's row of each output pixel's centre tap (s*y, s*x).
    self.base = (pix // (plan["ho"] * plan["wo"])) * (h * w) + st * (self.y * w + self.x)

  def inside(self, dy, dx):
    """Lean tiles: whether pixel (y + dy, x + dx) lies in the image, for each live row."""
    h, w = self.plan["h"], self.plan["w"]
    ok = self.live
    if dy:
      ok = ok & ((self.y >= -dy) if dy < 0 else (self.y < h - dy))
    if dx:
      ok = ok & ((self.x >= -dx) if dx < 0 else (self.x < w - dx))
    return ok

  def lean_start(self, dy, dx):
    """Lean tiles: the first of the m contiguous rows that hold pixel (y + dy, x + dx)
    of each row. It may lie before the input's first row on a GPU (those rows are
    masked, so not read); interpreted, the input carries ``plan["guard"]`` rows in
    front (``stencil.lean_plan``)."""
    return self.p0 + dy * self.plan["w"] + dx + self.plan["guard"]

  def shifted(self, ref, dy, dx, cols, ok):
    """Lean tiles: ``ref``'s channels ``cols`` (a ``pl.ds``) at pixel (y + dy, x + dx)
    of each row (:meth:`lean_start`), (m, channels) float32, 0 where ``ok`` (m,) is
    off."""
    from qlhs_jax.kernels.d_bn_product import plt
    start = self.lean_start(dy, dx)
    return plt.load(ref.at[pl.ds(start, self.plan["m"]), cols], mask=ok[:, None],
                    other=0.0).astype(F32)

  def operand(self, ref, dy, dx, cols, ok=None):
    """``ref``'s channels ``cols`` ((1, k) indices) at pixel (y + dy, x + dx) of each
    row, (m, k) in ``ref``'s dtype, 0 outside the image; ``ok`` (m,), lean tiles only:
    the rows loaded, in place of those in the image (a subset of them, such as the
    rows of a tile that is not a repeat). A tap as an operand of a matrix product: one
    masked load with nothing after it, so that Triton's pipeliner copies it straight
    into the shared memory that the tensor cores read. After a select or a cast (even
    one undone, bfloat16 to float32 and back), the warps load it from the pipeliner's
    buffer, convert it and store it again for the products, behind two barriers a tap
    (benchmarks/NOTES.md, experiment 44)."""
    from qlhs_jax.kernels.d_bn_product import plt
    if self.lean:
      rows = lax.broadcasted_iota(jnp.int32, (self.plan["m"], 1), 0)
      at = self.lean_start(dy, dx) + rows
      ok = self.inside(dy, dx) if ok is None else ok
    else:
      if ok is not None:
        raise ValueError("_Tile.operand: ok is for lean tiles (stride 1) only")
      at, ok = self.tap_rows(dy, dx)
      at = at[:, None]
    return plt.load(ref.at[at, cols], mask=ok[:, None], other=0.0)

  def tap_rows(self, dy, dx):
    """Tiles that are not lean: u's row of each pixel's tap (dy, dx), clamped into u,
    and whether the tap lies in the image, (m,) each."""
    plan = self.plan
    yy, xx = plan["stride"] * self.y + dy, plan["stride"] * self.x + dx
    ok = (yy >= 0) & (yy < plan["h"]) & (xx >= 0) & (xx < plan["w"])
    row = jnp.clip(self.base + dy * plan["w"] + dx, 0, plan["b"] * plan["h"] * plan["w"] - 1)
    return row, ok

  def tap(self, u_ref, t, j0, bj):
    """Tap t = 3*(dy+1) + (dx+1) of u at this tile's pixels, channels j0..j0+bj:
    (m, bj) float32, 0 where the tap is outside the image."""
    dy, dx = t // 3 - 1, t % 3 - 1
    if self.lean:
      return self.shifted(u_ref, dy, dx, pl.ds(j0, bj), self.inside(dy, dx))
    row, ok = self.tap_rows(dy, dx)
    return jnp.where(ok[:, None], u_ref[row, pl.ds(j0, bj)].astype(F32), 0.0)

  def d(self, u_ref, k_ref, s, j0, bj, on_tap=None):
    """D u for hidden channels (j, s), j in j0..j0+bj: (m, bj) float32. ``on_tap(t, tap)``
    sees each tap as it is added, so that a second use of it needs no second load (kept
    for later, the nine taps would be live together: register spills)."""
    acc = None
    for t in range(9):
      tap = self.tap(u_ref, t, j0, bj)
      if on_tap is not None:
        on_tap(t, tap)
      term = tap * k_ref[s, t, pl.ds(j0, bj)][None, :]
      acc = term if acc is None else acc + term
    return acc

  def u(self, u_ref):
    """u at the tile's pixels (the strided grid's): the 1x1 maps' input, (m, n)."""
    return u_ref[self.base, :]


def _vec(ref, s, j0, bj):
  return ref[s, pl.ds(j0, bj)][None, :]


def _slice_loop(plan, body, init):
  """``body(s, j0, carry)`` over the (channel block, s) slices of the hidden channels,
  as a loop (not unrolled: unrolled, Triton loads the nine taps once for all s and keeps
  them live, and ptxas spills)."""
  e, bj = jnp.int32(plan["e"]), jnp.int32(plan["bjf"])
  return lax.fori_loop(jnp.int32(0), jnp.int32((plan["n"] // plan["bjf"]) * plan["e"]),
                       lambda sl, carry: body(lax.rem(sl, e), lax.div(sl, e) * bj, carry),
                       init)


def _forward_kernel(u_ref, c_ref, a_ref, k_ref, mul_ref, add_ref, y_ref, *, plan):
  tile = _Tile(pl.program_id(0) * plan["m"], plan)
  ut = tile.u(u_ref)
  dt, bj = ut.dtype, plan["bjf"]

  def body(s, j0, acc):
    q = _rnd(_dot(ut, c_ref[s, :, pl.ds(j0, bj)]), dt)
    f1 = tile.d(u_ref, k_ref, s, j0, bj) * _vec(mul_ref, s, j0, bj) + _vec(
        add_ref, s, j0, bj)
    return acc + _dot((f1 * q).astype(dt), a_ref[s, pl.ds(j0, bj), :])
  acc = _slice_loop(plan, body, jnp.zeros((plan["m"], plan["n_out"]), F32))
  y_ref[pl.ds(tile.p0, plan["m"]), :] = acc.astype(y_ref.dtype)


def _sums_kernel(u_ref, dy_ref, c_ref, a_ref, k_ref, mul_ref, add_ref, mean_ref,
                 rstd_ref, sg_ref, sgx_ref, tg_ref, da_ref, dc_ref, *, plan):
  e, bj, n, n_out = plan["e"], plan["bj"], plan["n"], plan["n_out"]
  sl, ch = pl.program_id(0), pl.program_id(1)
  s, j0 = sl % e, (sl // e) * bj
  cs = c_ref[s, :, pl.ds(j0, bj)]
  as_ = a_ref[s, pl.ds(j0, bj), :]
  mul, add, mean, rstd = (_vec(r, s, j0, bj) for r in (mul_ref, add_ref, mean_ref,
                                                          rstd_ref))

  def body(i, carry):
    sg, sgx, tg, da, dc = carry
    ti = ch * plan["tpc"] + i
    tile = _Tile(jnp.minimum(ti, plan["tiles"] - 1) * plan["m"], plan)
    ut = tile.u(u_ref)
    dt = ut.dtype
    # A tile past the end (the last chunk's) reads the last tile and counts nothing.
    dyt = dy_ref[pl.ds(tile.p0, plan["m"]), :] * (ti < plan["tiles"]).astype(dt)
    q = _rnd(_dot(ut, cs), dt)
    dp = _rnd(_dot(dyt, as_, tb=True), dt)
    g = dp * q  # 0 on the rows past the last pixel: dy is 0 there
    # Each tap feeds D u and dL/dkernel's tap sum at once.
    tg_new = []
    x = tile.d(u_ref, k_ref, s, j0, bj,
               on_tap=lambda t, tap: tg_new.append(tg[t] + (tap * g).sum(0)))
    f1 = x * mul + add
    return (sg + g.sum(0), sgx + (g * ((x - mean) * rstd)).sum(0), tuple(tg_new),
            da + _dot((f1 * q).astype(dt), dyt, ta=True),
            dc + _dot(ut, (dp * f1).astype(dt), ta=True))
  z = jnp.zeros((bj,), F32)
  init = (z, z, (z,) * 9, jnp.zeros((bj, n_out), F32), jnp.zeros((n, bj), F32))
  sg, sgx, tg, da, dc = lax.fori_loop(0, plan["tpc"], body, init)
  sg_ref[ch, s, pl.ds(j0, bj)] = sg
  sgx_ref[ch, s, pl.ds(j0, bj)] = sgx
  for t in range(9):
    tg_ref[ch, s, t, pl.ds(j0, bj)] = tg[t]
  da_ref[ch, s, pl.ds(j0, bj), :] = da
  dc_ref[ch, s, :, pl.ds(j0, bj)] = dc


def _dx_kernel(u_ref, dy_ref, c_ref, a_ref, k_ref, mul_ref, add_ref, mean_ref, cx_ref,
               c0_ref, dx_ref, du_ref, *, plan):
  tile = _Tile(pl.program_id(0) * plan["m"], plan)
  ut = tile.u(u_ref)
  dt, bj = ut.dtype, plan["bjf"]
  dyt = dy_ref[pl.ds(tile.p0, plan["m"]), :]

  def body(s, j0, acc):
    cs = c_ref[s, :, pl.ds(j0, bj)]
    q = _rnd(_dot(ut, cs), dt)
    x = tile.d(u_ref, k_ref, s, j0, bj)
    mul = _vec(mul_ref, s, j0, bj)
    f1 = x * mul + _vec(add_ref, s, j0, bj)
    dp = _rnd(_dot(dyt, a_ref[s, pl.ds(j0, bj), :], tb=True), dt)
    dx = (dp * q * mul + (x - _vec(mean_ref, s, j0, bj)) * _vec(cx_ref, s, j0, bj)
          + _vec(c0_ref, s, j0, bj))
    dx_ref[pl.ds(tile.p0, plan["m"]), pl.ds(j0, bj), s] = dx.astype(dx_ref.dtype)
    return acc + _dot((dp * f1).astype(dt), cs, tb=True)
  acc = _slice_loop(plan, body, jnp.zeros((plan["m"], plan["n"]), F32))
  du_ref[pl.ds(tile.p0, plan["m"]), :] = acc.astype(du_ref.dtype)


def _call(kernel, plan, grid, out_shape, args, interpret):
  params = {}
  if not interpret:
    params["compiler_params"] = dbn.plt.CompilerParams(num_warps=plan["warps"],
                                                       num_stages=1)
  return pl.pallas_call(functools.partial(kernel, plan=plan), out_shape=out_shape,
                        grid=grid, interpret=interpret,
                        name=f"qlhs_eq3_{kernel.__name__.strip('_')}", **params)(*args)


def forward_call(plan, args, interpret=False):
  """The forward kernel: ``args = (u2, C_s, A_s, D_s, mul, add)`` -> y rows, padded to
  the tiles' end."""
  return _call(_forward_kernel, plan, (plan["tiles"],),
               jax.ShapeDtypeStruct((plan["tiles"] * plan["m"], plan["n_out"]),
                                    args[0].dtype), args, interpret)


def sums_call(plan, args, interpret=False):
  """The sums kernel: ``args = (u2, dy rows, C_s, A_s, D_s, mul, add, mean, rstd)`` ->
  per-chunk partial sums (BatchNorm's two, the nine tap sums, dA_s, dC_s)."""
  n, e, ch = plan["n"], plan["e"], plan["chunks"]
  part = lambda *shape: jax.ShapeDtypeStruct((ch, e) + shape, F32)
  return _call(_sums_kernel, plan, ((n // plan["bj"]) * e, ch),
               (part(n), part(n), part(9, n), part(n, plan["n_out"]), part(n, n)), args,
               interpret)


def dx_call(plan, args, interpret=False):
  """The dx kernel: ``args = (u2, dy rows, C_s, A_s, D_s, mul, add, mean, cx, c0)`` ->
  (dx rows (pixels, n, e), du1 rows), padded to the tiles' end."""
  rows, dt = plan["tiles"] * plan["m"], args[0].dtype
  return _call(_dx_kernel, plan, (plan["tiles"],),
               (jax.ShapeDtypeStruct((rows, plan["n"], plan["e"]), dt),
                jax.ShapeDtypeStruct((rows, plan["n"]), dt)), args, interpret)


CALLS = {"forward": forward_call, "sums": sums_call, "dx": dx_call}


def _slices(v):
  """(1, n, e) per-channel vectors -> (e, n) rows per s."""
  return v[0].T


def _weights(cw, aw, k9, e):
  """Per-s weight slices: C_s (e, n_in, n), A_s (e, n, n_out), D's kernel (e, 9, n)."""
  n_in, hdim = cw.shape
  n = hdim // e
  return (cw.reshape(n_in, n, e).transpose(2, 0, 1),
          aw.reshape(n, e, aw.shape[1]).transpose(1, 0, 2), k9.transpose(2, 0, 1))


def check(u_shape, cw_shape, aw_shape, kernel_shape):
  """Refuses what the kernels cannot do, naming the fix."""
  if len(u_shape) != 4:
    raise ValueError(f"eq3_hidden expects u (B, H, W, n), got shape {u_shape}")
  n = u_shape[-1]
  kh, kw, kj, e = kernel_shape
  if (kh, kw) != (3, 3) or kj not in (1, n) or cw_shape != (n, n * e) or (
      len(aw_shape) != 2 or aw_shape[0] != n * e):
    raise ValueError(f"eq3_hidden: kernel {kernel_shape}, C {cw_shape}, A {aw_shape} do "
                     f"not fit u {u_shape} (want C ({n}, {n * e}), A ({n * e}, n_out))")
  for name, v in (("n", n), ("n_out", aw_shape[1])):
    if v < 16 or v & (v - 1):
      raise ValueError(f"fuse_d_bn='block' needs a power-of-two {name} >= 16 "
                       f"(Triton block shapes and dot), got {v}; use fuse_d_bn='xla'")
  dbn.check_pallas(e, "block")


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _op(u, cw, aw, kernel, scale, bias, stride, hw, eps, interpret):
  return _forward(u, cw, aw, kernel, scale, bias, stride, hw, eps, interpret)[0]


def _forward(u, cw, aw, kernel, scale, bias, stride, hw, eps, interpret):
  del hw  # u's (H, W), for the backward
  b, _, _, n = u.shape
  e, n_out = kernel.shape[-1], aw.shape[1]
  k9 = dbn._kernel9(kernel, n)
  s1, s2, tstats = dbn._stats(u, k9, stride, 1)
  plan = _plan(u.shape, n_out, e, stride, "forward")
  mean, var, rstd, mul, add = dbn.bn_affine(s1, s2, plan["rows"], scale, bias, eps)
  u2 = u.reshape(-1, n)  # rows of pixels; the kernels clamp and mask their taps
  cs, as_, ks = _weights(cw, aw, k9, e)
  y = forward_call(plan, (u2, cs, as_, ks, _slices(mul), _slices(add)), interpret)
  y = y[:plan["rows"]].reshape(b, plan["ho"], plan["wo"], n_out)
  hdim = n * e
  return ((y, mean.reshape(1, hdim), var.reshape(1, hdim)),
          (u2, cw, aw, kernel, scale, bias, mean, rstd, mul, add, tstats))


def _fwd(u, cw, aw, kernel, scale, bias, stride, hw, eps, interpret):
  return _forward(u, cw, aw, kernel, scale, bias, stride, hw, eps, interpret)


def _bwd(stride, hw, eps, interpret, res, cts):
  del eps
  u2, cw, aw, kernel, scale, bias, mean, rstd, mul, add, tstats = res
  dy, dmean, dvar = cts
  b, ho, wo, n_out = dy.shape
  (h, w), n, e = hw, u2.shape[1], kernel.shape[-1]
  k9 = dbn._kernel9(kernel, n)
  plan_sums = _plan((b, h, w, n), n_out, e, stride, "sums")
  plan_dx = _plan((b, h, w, n), n_out, e, stride, "dx")
  dy2 = dy.astype(u2.dtype).reshape(-1, n_out)
  cs, as_, ks = _weights(cw, aw, k9, e)
  sg, sgx, tg, da, dc = sums_call(
      plan_sums, (u2, _pad_rows(dy2, plan_sums), cs, as_, ks, _slices(mul), _slices(add),
                  _slices(mean), _slices(rstd)), interpret)
  sg, sgx = sg.sum(0).T[None], sgx.sum(0).T[None]  # (1, n, e), like d_bn_product's
  tg = tg.sum(0).transpose(2, 1, 0)[None]  # (1, n, 9, e)
  rows = plan_sums["rows"]  # output pixels, as in every kernel's plan
  dmean = dmean.astype(F32).reshape(1, n, e)
  dvar = dvar.astype(F32).reshape(1, n, e)
  # BatchNorm's backward, as in d_bn_product._bwd: dL/d(D u) = mul*g + cx*(x - mean) + c0.
  cx, c0 = dbn.bn_backward_coeffs(mul, rstd, sg, sgx, dmean, dvar, rows)
  dk9 = dbn._xla_kernel_grad(tg, tstats, k9, mean, mul, cx, c0)
  dx, du1 = dx_call(
      plan_dx, (u2, _pad_rows(dy2, plan_dx), cs, as_, ks, _slices(mul), _slices(add),
                _slices(mean), _slices(cx), _slices(c0)), interpret)
  # du1 in the dx kernel's dtype: the Pallas du kernel adds it in float32 itself (a
  # float32 copy made here was one more 0.3 GB pass per stage-1 block).
  du1 = du1[:rows].reshape(b, ho, wo, n)
  if stride != 1:  # the 1x1 maps read u[:, ::s, ::s]: du1 goes back to those pixels
    du1 = lax.pad(du1, jnp.zeros((), du1.dtype),
                  [(0, 0, 0), (0, h - (ho - 1) * stride - 1, stride - 1),
                   (0, w - (wo - 1) * stride - 1, stride - 1), (0, 0, 0)])
  dx = dx[:rows].reshape(b, ho, wo, n, e)
  du_dot = dbn.du_pallas(n, e)
  if du_dot is not None:  # du1 added in the kernel, du stored in u's dtype
    from qlhs_jax.kernels import stencil  # stencil imports d_bn_product, not us
    du = stencil.d_transpose(dx, k9, stride, (h, w), addends=(du1,), out_dtype=u2.dtype,
                             interpret=interpret, dot=du_dot)
  else:
    du = dbn._d_transpose(dx, k9, stride, (h, w)) + du1.astype(F32)
  dcw = dc.sum(0).transpose(1, 2, 0).reshape(n, n * e)  # C[i, j*e + s] = C_s[i, j]
  daw = da.sum(0).transpose(1, 0, 2).reshape(n * e, n_out)
  hdim = n * e
  return (du.astype(u2.dtype), dcw.astype(cw.dtype), daw.astype(aw.dtype),
          dbn.kernel_grad_like(dk9, kernel), sgx[0].reshape(hdim).astype(scale.dtype),
          sg[0].reshape(hdim).astype(bias.dtype))


_op.defvjp(_fwd, _bwd)


def eq3_hidden(u: jax.Array, cw: jax.Array, aw: jax.Array, kernel: jax.Array,
               scale: jax.Array, bias: jax.Array, *, stride: int = 1, eps: float = 1e-5,
               interpret: bool = False):
  """``y = (BN(D u) * (u_s @ cw)) @ aw`` with training-mode batch statistics, where D
  strides by ``stride`` and ``u_s = u[:, ::stride, ::stride]`` (Eq.(3)'s strided block).

  ``u`` (B, H, W, n) in the compute dtype; ``cw`` (n, n*e) and ``aw`` (n*e, n_out) the
  1x1 maps in the compute dtype (j-major hidden channels ``j*e + s``); ``kernel``
  (3, 3, 1 or n, e), in float32 or rounded to u's dtype (``d_bn_product.d_kernel``);
  ``scale``, ``bias`` (n*e,) the BatchNorm parameters. Returns ``(y, mean, var)``: y
  (B, Ho, Wo, n_out) in u's dtype, mean and biased variance of D u, (1, n*e) float32.
  Differentiable in every array argument.
  """
  check(u.shape, cw.shape, aw.shape, kernel.shape)
  if stride < 1:
    raise ValueError(f"eq3_hidden: stride {stride} < 1")
  kernel = dbn.fused_kernel(kernel, u.dtype)
  return _op(u, cw, aw, kernel, scale, bias, stride, tuple(u.shape[1:3]), eps, interpret)


def reference(u, cw, aw, kernel, scale, bias, *, stride=1, eps=1e-5):
  """The plain formula (``d_bn_product.reference`` between the two matmuls), for tests."""
  c = jnp.dot(u[:, ::stride, ::stride], cw)
  p, mean, var = dbn.reference(u, c, kernel, scale, bias, stride=stride, eps=eps)
  return jnp.dot(p, aw), mean, var
