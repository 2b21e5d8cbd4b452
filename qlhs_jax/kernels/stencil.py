"""The 3x3 stencil's per-pixel reductions as Pallas kernels: the sums and Gram matrix of
u's taps (BatchNorm's statistics of D u, read from u), pass 3's sums of
``fuse_d_bn="xla"``, and du = D^T dx.

Why: XLA writes them as fusions of padded slices, and on the H100 two of them ran far
below the memory's speed (benchmarks/NOTES.md, experiment 12), in the profile of
``fuse_d_bn="block"`` at e921571:

- the statistics, one reduction of 54 stacked pieces (9 taps, 45 tap products): 6.5 ms
  per stage-1 block for 0.11 GB (17 GB/s). Its PTX (deviceless, sm_90a) finds each
  element's piece by a binary tree of branches over the 54-way concatenation, then
  loads its two taps as scalar 16-bit loads behind the pad's bounds checks;
- du = D^T dx in the "gather" form: 5.3 ms for 0.72 GB (136 GB/s). The sum over e is
  four slices of the nine-tap sum, and a loop fusion evaluates each slice on its own:
  36 padded loads an output, each with its own index arithmetic;
- pass 3's sums (g, g * xhat, tap_t(u) * g; not in that profile) compile like the
  statistics: a branch per piece, scalar loads.

Here a program works on a tile of pixels (rows of the flattened ``(B*H*W, n)``) and a
block of channels: each tap is one vector load of whole rows of channels at computed
row indices, masked where the tap leaves the image (the index arithmetic is per pixel,
not per element), and every product is formed from taps held in registers. At stride 1
(:func:`lean_plan`) a tap is the m contiguous rows at a constant offset from the tile's
first, one masked load with no per-row index, clamp or select; du at stride 2 runs per
parity class of the input pixels, which needs four of the nine taps
(:func:`_du_parity_kernel`). By ptxas's instruction counts, that took du's issue time
at stage 1 from 0.326 to 0.237 ms and at stage 2's first block from 0.378 to 0.163
(``benchmarks.triton_compile --op stencil``; benchmarks/NOTES.md, experiment 16).

- :func:`tap_stats`: ``(54, 1, n)`` float32, the 9 tap sums and the 45 Gram entries
  ``(a, b), a <= b`` (``d_bn_product._PAIRS``), the layout of ``d_bn_product._xla_stats``.
  The pieces are split over ``splits`` launches (each loads only the taps its pieces
  use). A program keeps one running (pixels, channels) tile per piece over a chunk of
  tiles and sums it over the pixels once, at the end; XLA sums the chunks. At stride 1
  (QLHS_STATS_FORM=pallas, auto's pick) they come instead from :func:`lag_sums`: 13
  lag products per pixel and u's border terms (:func:`stats_from_lags`);
  ``pallas_gram`` keeps the 54 products at every stride.
- :func:`bn_sums`: pass 3's sums over the pixels, per hidden channel, from u, c and dp:
  g and the nine tap_t * g, with one running tile per sum like the statistics; the sum
  of g * xhat follows from them (``xhat=True``: summed from D u, the kernel before
  2026-12-04);
- the dot forms (QLHS_STATS_FORM / QLHS_SUMS_FORM=pallas_dot): the statistics' lags and
  pass 3's sums as matrix products over each tile's pixels, of which the kernel keeps
  the entries of each channel with itself (:func:`_bn_sums_dot_kernel`,
  :func:`_lags_dot_loop`): what the products buy is Triton's pipeliner, which issues the
  loads that feed a dot trips ahead (benchmarks/NOTES.md, experiment 40);
- :func:`d_transpose`: du (B, H, W, n) float32 (or ``out_dtype``) from dx (B, Ho, Wo, n,
  e) and D's kernel, plus any ``addends``: each input pixel gathers the output
  pixels whose taps read it, as contiguous loads of the block's n*e hidden channels,
  summed over e once at the end.

Selected by ``QLHS_STATS_FORM`` (d_bn_product's ``_stats``: ``fuse_d_bn="xla"`` and
``"block"``), ``QLHS_SUMS_FORM`` (``_xla_backward_sums``: "xla") and ``QLHS_DU_FORM``
(``_d_transpose``: "xla", "block", "pallas" and ``d_impl="shifted_t"``): ``pallas``,
or unset ("auto", ``d_bn_product.stencil_on_gpu``: on NVIDIA GPUs; on a mesh, inside
``d_bn_product`` on each GPU's slice of the batch). XLA's forms stay the reference,
and the default elsewhere. They need a power-of-two ``n`` and expansion (Triton block
shapes) and, for the sums, one BatchNorm group (per device).
Tiling: ``QLHS_STENCIL_TILING``, e.g. ``"stats=32,16,4,3 sums=16,8,4 du=32,16,4"``
(pixels, channels, warps[, splits]); defaults :data:`DEFAULT_TILING`.
``QLHS_STENCIL_ROWS`` (e.g. ``"du,sums"`` or ``"all"``; unset, none) makes the
statistics' lags, du, pass 3's sums and the product and pass 4 (``"product"``) walk
down strips of an image's columns at stride 1, loading each row of their input at three
shifts (five for the lags) instead of each tap at nine (thirteen) (:func:`rows_kernels`;
the section "Row walks" below); ``"dx_du"`` runs pass 4 and du as one walk
(:func:`dx_du`), dx never stored; ``"bwd"`` runs pass 3's sums, dc and du's share from
g as one walk (:func:`bwd`), then du's share from u as a 5x5 stencil (:func:`du_bn`):
c and dp read once for the whole backward. On a CPU the
kernels run interpreted (tests). On an H100 they made the "xla" step 2.8x faster
(NOTES.md experiment 13; ``benchmarks.stencil_times`` times them alone).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from qlhs_jax.kernels import settings

F32 = jnp.float32
KERNELS = ("stats", "du", "sums", "product", "dx_du", "bwd", "du_bn", "sums_dot",
           "stats_dot", "du_dot", "product_dot", "grads_dot", "product_a_dot")
# Each kernel's name in the compiled program (and in benchmarks.triton_compile's report).
NAMES = {"stats": "qlhs_tap_stats", "sums": "qlhs_bn_sums", "du": "qlhs_d_transpose",
         "sums_dot": "qlhs_bn_sums_dot", "lags_dot": "qlhs_lag_sums_dot",
         "du_dot": "qlhs_d_transpose_dot", "product_dot": "qlhs_product_dot",
         "dx_dot": "qlhs_dx_dc_dot", "dx_grads_dot": "qlhs_dx_dc_grads_dot",
         "product_a_dot": "qlhs_product_a_dot",
         "lags": "qlhs_lag_sums", "product": "qlhs_product", "dx": "qlhs_dx_dc",
         "dx_du": "qlhs_dx_du", "bwd": "qlhs_bwd", "du_bn": "qlhs_du_bn"}
# (pixels per tile, channels per program, warps[, splits]): what benchmarks.stencil_times
# chose over the whole network on an H100 and the train step then ran (2026-11-27, NOTES.md
# experiment 13: "xla" with the three Pallas forms at 5,771 and 5,725 img/s in two runs).
# That sweep, and every one until 2026-12-04, timed each form's first tiling's kernel
# under every tiling's name (jax.jit reused the trace; NOTES.md, experiment 24): these
# tiles are what the step ran, not the best of a sweep. One launch of the statistics
# (splits 1): u is read once; a second pick, with 3 launches and the pass-3 sums at
# 16,8,8 (never itself timed alone), made the step 11% slower. ptxas (triton 3.9.0):
# 56 (the lags), 114 and 136 registers at stage 1, no spills.
# The product's and pass 4's tiles (QLHS_PRODUCT_FORM=pallas; dx_dc takes the product's):
# 16 pixels by 16 input channels, 8 warps: one element of each tap a thread. At 32,16,4
# (du's shape, what experiment 23 timed) a tap of u is four channels a thread, and the
# broadcast over the expansion wants two: Triton then moves each tap through shared
# memory (a store, a barrier, a load) before the next tap's load issues (the deviceless
# PTX; benchmarks/NOTES.md, experiment 38). At two elements a thread (16,32,8, the
# default for one day) there is no barrier, but ptxas (38 registers) still has a thread
# wait for its loads 8 times in the product, 6 in pass 4: it will not hold D's kernel
# for two input channels, 72 floats, at once. At one element a thread a thread needs
# 36, and ptxas keeps the loads in 4 waits (7 in pass 4) at 32 registers, 64 warps an
# SM (machine code; experiment 39). More instructions, though: the product's issue
# floor 0.187 -> 0.235 ms at stage 1 (its copy time 0.308). None is timed alone.
# The dot forms (QLHS_SUMS_FORM / QLHS_STATS_FORM=pallas_dot): pixels (the products'
# depth) by 16 input channels (the products' 16 rows: mma.sync, no wait for them; the
# sums' columns are 64 hidden at e = 4), 4 warps, 3 stages of Triton's pipelined loads
# (pixels, channels, warps, stages). Deviceless at stage 1 (jax[cuda12] 0.11.2;
# benchmarks/NOTES.md, experiment 40), a launch's issue floor: the sums at 64 pixels
# 0.128 ms (254 registers, 84 KB of shared memory: 2 programs an SM; 3 barriers a trip
# since experiment 45; as wgmma 0.157 ms, 5 and 9 waits for products, and before
# experiment 44 22 barriers at 0.136 ms), against 0.167 for the tiles at 32,8,4; the
# lags at 32 pixels 0.088 (184 registers, 27 KB), against 0.119 at 16,16,4. At 64 pixels a
# thread copies 16 bytes of a tap, which the machine code copies past L1
# (LDGSTS.BYPASS): every tap a read from L2, 13 of u for the lags. At 32 pixels, 8
# bytes, through L1, where the taps overlap: the lags take that (their floor, 0.061 at
# 64, stays far under the copy time either way); the sums kept 64 (until 2026-12-07:
# below), whose floor at 32 (0.157; 0.186 as wgmma) nears the H200's copy time (0.215).
# du as products (QLHS_DU_FORM=pallas_dot): 64 pixels by 8 input channels (32 hidden;
# the products' columns, 4 an input channel, are 32), 4 warps, 3 stages: 93 KB of shared
# memory (2 programs an SM), 56 registers, 321 instructions a trip (an issue floor of
# 0.130 ms at stage 1, against the element-wise kernel's 0.224), its taps copied 2 trips
# ahead but 16 bytes a thread, past L1: nine reads of the hidden dx from L2 a launch,
# 3.7 GB at stage 1. At 1 stage its taps load through L1, but a thread waits for them 9
# times a trip, at 7 programs an SM: by the element-wise kernel's measured time, more
# waits in turn than it has (experiment 41). Neither timed. The forward product's and
# pass 4's products (QLHS_PRODUCT_FORM=pallas_dot): 64 pixels by 4 input channels (the
# products m64n16k16: 4 parts of D's kernel by 4 channels deep, 16 hidden channels
# wide), 4 warps, 2 stages: 47 and 51 KB of shared memory (4 programs an SM), 54 and 68
# registers, 257 and 317 instructions a trip, no wait for a load in a trip; issue floors
# 0.201 and 0.247 ms at stage 1, against XLA's fusions' 0.218 and 0.281 (copy times 0.31
# and 0.58 at an H100's 3.0 TB/s). A trip's taps copy 8 bytes a thread, through L1; c
# and dp 16, past it (experiment 42). Not timed.
# The lags' (stats_dot) 4 stages and pass 4's with the weight gradients (grads_dot) 4
# warps: by the latency model (benchmarks.warp_cycles: one warp's cycles from the
# control codes ptxas set, every loop trip counted, over the warps an SM holds;
# NOTES.md experiment 53) the step's lags take 1.54 ms at 4 stages against 1.66 at 3
# (two trips of copies in flight instead of one, the same instructions, the same
# copies through L1), and pass 4 1.83 at 4 warps against 2.56 at 8 (19% fewer
# instructions; 255 registers, 8 warps an SM at stage 1 instead of 16, 20 bytes
# spilled at one block shape). Until 2026-12-07 they were 32,16,4,3 and 32,16,8,3,
# chosen by issue floors alone (experiments 40 and 48). Not timed; `gpu_h100.sh tiles`
# times both against the old tiles.
# Pass 3's sums (sums_dot) at 32 pixels, and the products at one part of D's kernel
# (ONE_PART_TILING) at 2 stages, since 2026-12-07 by the latency model with shared
# memory counted (NOTES.md experiment 55): at 64 pixels the sums held 116-196 KB of
# shared memory a program where they make c (stages 1-3 and stage 4's first block), one
# program of 4 warps an SM, 3.47 ms a step; at 32 pixels 42-90 KB, two or three
# programs, 2.10 ms. The product and pass 4 at 3 stages held up to 118 KB (pass 4 at
# stages 3-4: one program), 1.56 ms the two; at 2 stages 1.30. Not timed; `gpu_h100.sh
# tiles` times both against the old.
DEFAULT_TILING = {"stats": (16, 16, 4, 1), "du": (32, 16, 4), "sums": (32, 8, 4),
                  "product": (16, 16, 8), "sums_dot": (32, 16, 4, 3),
                  "stats_dot": (32, 16, 4, 4), "du_dot": (64, 8, 4, 3),
                  "product_dot": (64, 4, 4, 2), "grads_dot": (32, 16, 4, 3),
                  "product_a_dot": (64, 16, 4, 2)}
# The row walks' (strip width, channels, warps) where QLHS_STENCIL_TILING does not name
# the kernel: the tiles' shapes, but 8 channels a program for the product's and pass 4's
# walks. ptxas at stage 1 (benchmarks.triton_compile --op stencil, triton 3.9.0), rows
# loaded where used: those two at 55 and 76 registers with 8 channels, 77 and 130 with
# 16, for the same instructions. Now (rows loaded ahead): the statistics', du's, the
# sums', the product's and pass 4's walks at 80, 128, 143, 64 and 80. Not yet timed.
# dx_du (pass 4 and du in one walk; no tiles): a strip is whole rows, so at stage 1 these
# are 64 lanes by 4 channels (dx_du()); ptxas 191 registers, 95 at 32,4,4. Not timed.
# bwd (pass 3's sums, dc and du's share from g in one walk) keeps ten running sums a
# value besides dx_du's work: 4 channels (2 at stage 1: 64 lanes), 4 values a thread,
# 147 registers (at 32,8,4: 255, no spills); du_bn (u alone, a 5x5 stencil) carries
# 20 shifted rows: 168 registers at 32,8,4, spills at 32,16,4. Not timed (NOTES.md,
# experiment 29).
ROWS_TILING = dict(DEFAULT_TILING, product=(32, 8, 4), dx_du=(32, 8, 4), bwd=(32, 4, 4),
                   du_bn=(32, 8, 4))
# The product's products' default with one part of D's kernel (stencil._k_parts: a
# float32 u, or QLHS_D_KERNEL=compute), whose sides of 16 then need 16 input channels a
# block at e = 4 (4 with three parts). At 3 stages (the default until 2026-12-07) and
# stage 1's shapes the product and pass 4 have 96 and 128 registers and 54 KB of shared
# memory (4 programs an SM, each 2 trips of copies ahead: ~40 and ~70 KB in flight an
# SM), 262 and 390 instructions a trip, no wait; issue floors 0.104 and 0.154 ms
# (experiment 43); at stages 3-4, where they run, 54-118 KB. Now 2 stages (above).
ONE_PART_TILING = {"product_dot": (32, 16, 4, 2)}
# Programs a summing launch (statistics, pass-3 sums) aims for: ~8 per SM of an H100.
STATS_PROGRAMS = 1056
# The entries whose fourth field is the pipeline's stages (the dot forms').
_STAGED = ("sums_dot", "stats_dot", "du_dot", "product_dot", "grads_dot",
           "product_a_dot")
_HELP = ("want whitespace-separated 'KERNEL=pixels,channels,warps[,splits|stages]' "
         "entries, e.g. 'stats=32,16,4,3 du=32,16,4 sums=16,8,4 sums_dot=64,16,4,3' "
         "(KERNEL stats, du, sums, product, dx_du, bwd, du_bn, sums_dot, stats_dot, "
         "du_dot, product_dot, grads_dot or product_a_dot; pixels and channels powers "
         "of two, warps 1-16; splits, the statistics' launches, 1-54, stats only; "
         "stages, the pipelined loads in flight, 1-4, the dot forms' entries only)")


def tiling(kernel: str, rows: bool = False, defaults: dict | None = None
           ) -> tuple[int, ...]:
  """(pixels, channels, warps[, splits or stages]) of ``kernel`` from
  QLHS_STENCIL_TILING, else ``defaults``' or :data:`DEFAULT_TILING`'s (``rows``, or
  dx_du, which only walks: :data:`ROWS_TILING`'s). "lags" (:func:`lag_sums`) takes the
  statistics' entry, "dx" (:func:`dx_dc`) the product's."""
  kernel = {"lags": "stats", "dx": "product"}.get(kernel, kernel)
  raw = settings.get("QLHS_STENCIL_TILING")
  spec = {}
  pow2 = lambda v: v >= 1 and not v & (v - 1)
  for entry in raw.split():
    name, _, value = entry.partition("=")
    try:
      fields = tuple(int(v) for v in value.split(","))
    except ValueError:
      fields = ()
    want = 4 if name == "stats" or name in _STAGED else 3
    ok = (name in KERNELS and name not in spec and len(fields) == want
          and pow2(fields[0]) and pow2(fields[1]) and fields[2] in (1, 2, 4, 8, 16)
          and (name != "stats" or 1 <= fields[3] <= 54)
          and (name not in _STAGED or 1 <= fields[3] <= 4))
    if not ok:
      raise ValueError(f"{settings.name('QLHS_STENCIL_TILING')}={raw!r}: entry {entry!r} "
                       f"is not valid (or repeats a kernel); {_HELP}")
    spec[name] = fields
  walk_only = kernel not in DEFAULT_TILING  # dx_du
  if kernel in spec:
    return spec[kernel]
  return (defaults or (ROWS_TILING if rows or walk_only else DEFAULT_TILING))[kernel]


GRID_ORDERS = ("pixels", "channels")


def grid_order() -> str:
  """Which axis of a kernel's grid varies fastest, QLHS_STENCIL_GRID. A GPU starts a
  launch's programs in that order, so it decides what the programs resident at one time
  read. "pixels" (the default, what the H100 ran in experiments 11-13): consecutive
  tiles of one channel block, each reading a 64-128 B strip of every 512 B row of a
  stage-1 hidden tensor, the other strips of those rows a wave later; every kernel ran
  at ~1.1 TB/s at every tiling tried. "channels": the channel blocks of the same tiles
  run side by side and read each row whole at about the same time, as XLA's loop
  fusions (1.5-1.8 TB/s) do. The same sums either way; "channels" is not yet timed."""
  return settings.choice("QLHS_STENCIL_GRID", GRID_ORDERS)


TAP_COPIES = ("widest", "l1")


def tap_copy() -> str:
  """QLHS_TAP_COPY: how the dot forms' kernels copy u's taps into shared memory (the
  pipeliner's cp.async). A thread copies its run of contiguous channels, up to 16
  bytes, and Triton picks the caching by the copy's width: a 16-byte copy bypasses L1
  (cp.async.cg), so each of a tile's nine taps is a read of u from L2; an 8- or 4-byte
  one goes through L1 (cp.async.ca), where the taps overlap (the three shifts of a row
  are the same rows but one pixel). "widest" (the default): the runs the tile gives,
  16 bytes for pass 3's sums (sums_dot) and the forward product with A (product_a_dot)
  at 64 pixels by 16 channels, what the model of experiment 53 priced at 15.9 and 11.6
  GB a step from L2, and for du's taps of dx (du_dot) 23.4. "l1" (the configs'
  ``,dot_forms``): runs of at most 8 bytes (4 bfloat16 channels), so that every tap
  goes through L1, for twice the tap copies where the runs were 16 bytes (the lags'
  gathered load has one barrier a trip less): by that model about the same time (0.1
  ms more with shared memory counted), 27.1 GB a step from L2 instead of 39.0; the
  same values (benchmarks/NOTES.md, experiment 54). Not yet timed."""
  return settings.choice("QLHS_TAP_COPY", TAP_COPIES)


def _split_taps(width: int, dtype) -> bool:
  """Whether :func:`tap_copy` splits a tap's ``width`` contiguous channels of ``dtype``
  into runs: "l1", and more than 8 bytes."""
  return tap_copy() == "l1" and width * jnp.dtype(dtype).itemsize > 8


def _tap_runs(i: jax.Array, bj: int, dtype) -> jax.Array:
  """Channel offsets ``i`` (0..bj-1) of a gathered tap load as runs of at most 8 bytes
  where :func:`_split_taps`, else ``i`` itself. The value is the same (i // r * r +
  i % r); what changes is what Triton can prove of it: contiguous runs of r, so it
  copies r channels a thread at a time, through L1."""
  if not _split_taps(bj, dtype):
    return i
  run = 8 // jnp.dtype(dtype).itemsize
  return lax.div(i, run) * run + lax.rem(i, run)


def _grid(plan: dict, pixel_programs: int, channel_blocks: int) -> tuple[int, int]:
  """The launch grid, its fastest axis first (:func:`grid_order`)."""
  if plan["order"] == "channels":
    return channel_blocks, pixel_programs
  return pixel_programs, channel_blocks


def _ids(plan: dict):
  """(pixel program, channel block) of this program, whichever grid axis each is."""
  if plan["order"] == "channels":
    return pl.program_id(1), pl.program_id(0)
  return pl.program_id(0), pl.program_id(1)


def _interpret(interpret: bool | None, form: str) -> bool:
  """``interpret`` as given, else the model's rule (``d_bn_product.pallas_interpret``):
  interpreted on a CPU, Triton on an NVIDIA GPU, refused elsewhere naming ``form``."""
  if interpret is not None:
    return interpret
  from qlhs_jax.kernels.d_bn_product import pallas_interpret
  form = settings.name(form)
  return pallas_interpret(f"{form}=pallas", f"unset {form}")


def check(n: int, form: str, groups: int = 1, interpret: bool = False, e: int = 1):
  """Refuses what the kernels cannot do, naming the fix (``form``: the variable that
  asks for them; the message names its config.kernels key where that set it).
  Interpreted, any channel count works (one block of all channels where the tiling's
  does not divide it). ``e``: the expansion, for the kernels that load hidden channels
  (bj*e of them per program: a power of two too)."""
  from qlhs_jax.kernels.d_bn_product import plt
  form = settings.name(form)
  if plt is None:
    raise ValueError(f"{form}=pallas needs Pallas's Triton backend "
                     f"(jax.experimental.pallas.triton), which JAX {jax.__version__} does "
                     f"not have; unset {form}")
  if not interpret and (n < 1 or n & (n - 1)):
    raise ValueError(f"{form}=pallas needs a power-of-two channel count (Triton block "
                     f"shapes), got {n}; unset {form}")
  if not interpret and (e < 1 or e & (e - 1)):
    raise ValueError(f"{form}=pallas needs a power-of-two expansion (Triton block "
                     f"shapes), got {e}; unset {form}")
  if groups != 1:
    raise ValueError(f"{form}=pallas sums over one BatchNorm group, got {groups}; "
                     f"unset {form}")


def _geometry(b, h, w, stride):
  from qlhs_jax.models.layers import _out_size  # models imports this module
  ho, wo = _out_size(h, stride), _out_size(w, stride)
  return dict(b=b, h=h, w=w, ho=ho, wo=wo, stride=stride)


def _tiles(rows: int, n: int, m0: int, bj0: int) -> dict:
  """``m`` rows per tile (at most the rows, rounded up to a power of two), ``bj``
  channels per program (all n where bj0 does not divide it: interpreted only), and the
  ``tiles`` that cover ``rows`` (the last may run past them: eq3_block._pad_rows)."""
  m = min(m0, pl.next_power_of_2(rows))
  bj = min(bj0, n) if n % min(bj0, n) == 0 else n
  return dict(n=n, m=m, bj=bj, rows=rows, tiles=-(-rows // m), order=grid_order())


def _chunked_plan(u_shape, stride, m0, bj0, every_block: bool = False) -> dict:
  """The geometry (what eq3_block._Tile reads), the tiles of the output pixels
  (:func:`_tiles`) and the chunks of a summing kernel: ``chunks`` of ``tpc`` tiles, one
  program per (chunk, channel block), about STATS_PROGRAMS in all; ``every_block``: one
  program a chunk, which loops over every channel block itself (:func:`product_a`)."""
  b, h, w, n = u_shape
  g = _geometry(b, h, w, stride)
  plan = dict(g, **_tiles(b * g["ho"] * g["wo"], n, m0, bj0))
  tiles = plan["tiles"]
  blocks = 1 if every_block else n // plan["bj"]
  chunks = min(tiles, max(1, -(-STATS_PROGRAMS // blocks)))
  tpc = -(-tiles // chunks)
  return dict(plan, tpc=tpc, chunks=-(-tiles // tpc))


def lean_plan(plan: dict, x2: jax.Array, interpret: bool) -> tuple[dict, jax.Array]:
  """At stride 1, ``plan`` made lean (``eq3_block._Tile``): each tap of the stencil's
  input ``x2`` (rows of channels: u, or dx for du) is one masked load of m contiguous
  rows at a constant offset from the tile's first row. On a GPU a masked row is not
  read, so a start before ``x2``'s first row is harmless. Interpreted, the load is a
  ``dynamic_slice``, which would move such a start to row 0 and shift every row: there
  ``x2`` gets ``guard`` zero rows in front (an image row and a pixel: the tap (-1, -1),
  and du's transposed (1, 1), reach back W + 1 rows; the lags only forward), and the
  starts move by as many. Other strides keep the per-row indices. Returns the plan and
  the input to pass."""
  if plan["stride"] != 1:
    return plan, x2
  guard = plan["w"] + 1 if interpret else 0
  if guard:
    x2 = jnp.pad(x2, ((guard, 0), (0, 0)))
  return dict(plan, lean=True, guard=guard), x2


# tl.dot's smallest block side: the dot forms' pixels and channels, and the lags' column
# of ones.
DOT_MIN = 16


def _dot_tiles(plan: dict, form: str, interpret: bool, channels: int = DOT_MIN) -> None:
  """Refuses a dot form's tiles under tl.dot's smallest block on a GPU (``form``: the
  variable that asked for it; ``channels``: the fewest input channels a block that
  keeps every side of its products at that)."""
  if not interpret and (plan["m"] < DOT_MIN or plan["bj"] < channels):
    raise ValueError(f"{settings.name(form)}=pallas_dot needs tiles of at least {DOT_MIN} "
                     f"pixels and {channels} channels (tl.dot's smallest block is "
                     f"{DOT_MIN}), got {plan['m']} pixels and {plan['bj']} of "
                     f"{plan['n']} channels; set {form}=pallas")


def _store_own(out_ref, ch, cols, plain, products, e: int):
  """The dot forms' outputs into out_ref[ch, k, cols]: the plain sums ``plain``
  (channels,) at k = 0, then of each of ``products`` (input channels, their hidden
  channels) the entries where the row is the column's input channel (column // e: e
  hidden channels an input channel; the lags' diagonal at e = 1), summed over the
  rows."""
  out_ref[ch, 0, cols] = plain
  shape = products[0].shape
  own = lax.broadcasted_iota(jnp.int32, shape, 0) == lax.broadcasted_iota(
      jnp.int32, shape, 1) // e
  for k, acc in enumerate(products, 1):
    out_ref[ch, k, cols] = jnp.sum(jnp.where(own, acc, 0.0), axis=0)


def _params(warps, interpret, stages=1):
  from qlhs_jax.kernels.d_bn_product import plt
  if interpret:
    return {}
  return {"compiler_params": plt.CompilerParams(num_warps=warps, num_stages=stages)}


# ------------------------------------------------------------------------------------
# The statistics: sums of the taps and of their pairwise products.

def _stats_pieces():
  """The 54 pieces in d_bn_product's order: ``("tap", t)`` then ``("pair", a, b)``."""
  from qlhs_jax.kernels.d_bn_product import _PAIRS
  return [("tap", t) for t in range(9)] + [("pair", a, b) for a, b in _PAIRS]


def _split(pieces, splits):
  """``splits`` contiguous groups of pieces, sizes as even as they go."""
  k, r = divmod(len(pieces), splits)
  out, i = [], 0
  for s in range(splits):
    size = k + (s < r)
    out.append(pieces[i:i + size])
    i += size
  return [g for g in out if g]


def _stats_kernel(u_ref, out_ref, *, plan, pieces):
  from qlhs_jax.kernels.eq3_block import _Tile  # the same tap loads as eq3_block's
  m, bj, tiles, tpc = plan["m"], plan["bj"], plan["tiles"], plan["tpc"]
  ch, cb = _ids(plan)
  j0 = cb * bj
  iota = lax.broadcasted_iota(jnp.int32, (m,), 0)
  need = sorted({t for p in pieces for t in p[1:]})

  def body(i, acc):
    ti = ch * tpc + i
    tile = _Tile(jnp.minimum(ti, tiles - 1) * m, plan)
    # Rows past the last pixel (and tiles past the end: the last chunk's) count nothing.
    live = (ti * m + iota < plan["rows"])[:, None]
    taps = {t: jnp.where(live, tile.tap(u_ref, t, j0, bj), 0.0) for t in need}
    return tuple(a + (taps[p[1]] if p[0] == "tap" else taps[p[1]] * taps[p[2]])
                 for a, p in zip(acc, pieces))
  # Whole (m, bj) tiles as running sums, summed over the pixels once at the end: summed
  # per tile, each piece cost shuffles and barriers in every iteration (360 shuffles and
  # 72 barriers per tile in the PTX, against 9 loads and 18 products).
  acc = lax.fori_loop(0, tpc, body, tuple(jnp.zeros((m, bj), F32) for _ in pieces))
  for k, a in enumerate(acc):
    out_ref[ch, k, pl.ds(j0, bj)] = a.sum(0)


def _total(part: jax.Array) -> jax.Array:
  """The programs' partial sums ``part`` (programs, ...) added up in one reduction.

  Why the barrier: XLA 0.12.1 pushes the slices that the callers take of the total
  (:func:`stats_from_lags`, :func:`_sums_out`) into the reduction, one reduction of the
  partials per slice: at each stride-1 block 15 kernels for the statistics and 2 for
  pass 3's sums, where 0.11.2 launched one each (deviceless; benchmarks/NOTES.md,
  experiment 46). The barrier keeps one kernel, the same sums."""
  return lax.optimization_barrier(part.sum(0))


def tap_stats(u: jax.Array, stride: int, interpret: bool | None = None,
              lags: bool = True, dot: bool = False) -> jax.Array:
  """``(54, 1, n)`` float32: over the output pixels of a stride-``stride`` 3x3 stencil
  on u (B, H, W, n) with zero padding, the sums of the nine taps and of the 45 tap
  products ``(a, b), a <= b`` (d_bn_product._PAIRS order), per input channel. At stride
  1 with ``lags`` (QLHS_STATS_FORM=pallas; "pallas_gram" turns it off) they come from
  :func:`lag_sums` and the border terms (:func:`stats_from_lags`), with ``dot`` as matrix
  products (QLHS_STATS_FORM=pallas_dot); otherwise each product is formed per pixel (54
  running sums)."""
  if lags and stride == 1:  # lag_sums checks u and the backend itself
    return stats_from_lags(lag_sums(u, interpret, dot))[:, None, :]
  interpret = _interpret(interpret, "QLHS_STATS_FORM")
  n = u.shape[-1]
  check(n, "QLHS_STATS_FORM", interpret=interpret)
  m0, bj0, warps, splits = tiling("stats")
  plan, u2 = lean_plan(_chunked_plan(u.shape, stride, m0, bj0), u.reshape(-1, n),
                       interpret)
  chunks, bj = plan["chunks"], plan["bj"]
  parts = []
  for group in _split(_stats_pieces(), splits):
    kernel = functools.partial(_stats_kernel, plan=plan, pieces=group)
    part = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((chunks, len(group), n), F32),
        grid=_grid(plan, chunks, n // bj), interpret=interpret, name=NAMES["stats"],
        **_params(warps, interpret))(u2)
    parts.append(_total(part))
  return jnp.concatenate(parts, 0)[:, None, :]


# ------------------------------------------------------------------------------------
# The statistics at stride 1 from lag products.
#
# At stride 1 a tap product's sum depends only on the offset d = b - a between the two
# taps, up to the image border: sum_p u(p+a) u(p+b) over the output pixels p is
# S_d = sum_q u(q) u(q+d) over the whole image (zero outside), less the same product
# over the ring of pixels just outside the image (where a tap can still land inside).
# d and -d give the same S_d, so 13 lags cover the 45 pairs, and the ring's terms are
# sums along the border rows and columns. The kernel forms 13 products (and u itself)
# per pixel instead of 54, with 14 running sums instead of 54; on the H100 the
# 54-product kernel ran the statistics of a stage-1 block at 213 GB/s, by its
# arithmetic rather than its bytes (benchmarks/NOTES.md, experiments 13 and 14).

# The lags (dy, dx) of one orientation each: dy > 0, or dy = 0 and dx >= 0.
LAGS = ((0, 0), (0, 1), (0, 2)) + tuple((dy, dx) for dy in (1, 2) for dx in range(-2, 3))


def _offset(t):
  return t // 3 - 1, t % 3 - 1


def _lags_dot_loop(u_ref, out_ref, plan, ch, j0, low):
  """:func:`_lags_kernel`'s main loop as matrix products over the tile's pixels
  (QLHS_STATS_FORM=pallas_dot): per lag d, u^T (bj, m) @ u(q + d) (m, bj), of which the
  diagonal is kept (1 in bj entries; the sum of u is u^T @ a column of ones), so that
  Triton pipelines the loads that feed them (:func:`_bn_sums_dot_kernel`). ``low``:
  bfloat16 for a bfloat16 u (its products exact, summed in float32), else float32 at
  HIGHEST."""
  from qlhs_jax.kernels.eq3_block import _Tile, _dot
  m, bj, tiles, tpc = plan["m"], plan["bj"], plan["tiles"], plan["tpc"]
  cols = pl.ds(j0, bj)
  iota = lax.broadcasted_iota(jnp.int32, (m,), 0)
  # QLHS_TAP_COPY=l1 (:func:`tap_copy`): u's channels as a gathered load, in runs that
  # Triton copies through L1
  gather = _split_taps(bj, u_ref.dtype)
  runs = j0 + _tap_runs(lax.broadcasted_iota(jnp.int32, (1, bj), 1), bj, u_ref.dtype)

  def load(tile, dy, dx, ok):
    if gather:
      return tile.operand(u_ref, dy, dx, runs, ok).astype(low)
    return tile.shifted(u_ref, dy, dx, cols, ok).astype(low)
  # u^T @ v over the tile's pixels: bfloat16 operands exact, summed in float32; float32
  # operands at HIGHEST (Triton: IEEE, not TF32)
  dot = functools.partial(_dot, ta=True)
  ones = jnp.ones((m, DOT_MIN), low)

  def body(i, acc):
    ti = ch * tpc + i
    tile = _Tile(jnp.minimum(ti, tiles - 1) * m, plan)  # lean: stride 1
    u0 = load(tile, 0, 0, ti * m + iota < plan["rows"])
    out = [acc[0] + dot(u0, ones)]
    for k, (dy, dx) in enumerate(LAGS):
      v = u0 if (dy, dx) == (0, 0) else load(tile, dy, dx, tile.inside(dy, dx))
      out.append(acc[1 + k] + dot(u0, v))
    return tuple(out)
  acc = lax.fori_loop(0, tpc, body, (jnp.zeros((bj, DOT_MIN), F32),)
                      + tuple(jnp.zeros((bj, bj), F32) for _ in LAGS))
  # (An element-wise sum of u, as the sums' of g, took more instructions here: 236 and
  # 349 a trip at 32 and 64 pixels, against 230 and 317; experiment 44.)
  first = lax.broadcasted_iota(jnp.int32, acc[0].shape, 1) == 0  # u^T @ the ones
  plain = jnp.sum(jnp.where(first, acc[0], 0.0), axis=1)
  _store_own(out_ref, ch, cols, plain, acc[1:], 1)


def _lags_kernel(u_ref, out_ref, *, plan, dot_dtype=None):
  from qlhs_jax.kernels.eq3_block import _Tile  # the same pixel indexing as eq3_block's
  m, bj, tiles, tpc = plan["m"], plan["bj"], plan["tiles"], plan["tpc"]
  h, w = plan["h"], plan["w"]
  ch, cb = _ids(plan)
  j0 = cb * bj
  cols = pl.ds(j0, bj)
  iota = lax.broadcasted_iota(jnp.int32, (m,), 0)

  def body(i, acc):
    ti = ch * tpc + i
    tile = _Tile(jnp.minimum(ti, tiles - 1) * m, plan)  # lean: stride 1
    # Rows past the last pixel (and tiles past the end) count nothing: u(q) is 0 there.
    u0 = tile.shifted(u_ref, 0, 0, cols, ti * m + iota < plan["rows"])
    out = [acc[0] + u0]
    for k, (dy, dx) in enumerate(LAGS):
      # u(q + d), 0 where q + d leaves the image
      v = u0 if (dy, dx) == (0, 0) else tile.shifted(u_ref, dy, dx, cols,
                                                      tile.inside(dy, dx))
      out.append(acc[1 + k] + u0 * v)
    return tuple(out)
  if dot_dtype is not None:  # the products' operand type (QLHS_STATS_FORM=pallas_dot)
    _lags_dot_loop(u_ref, out_ref, plan, ch, j0, dot_dtype)
  else:
    acc = lax.fori_loop(0, tpc, body, tuple(jnp.zeros((m, bj), F32)
                                            for _ in range(1 + len(LAGS))))
    for k, a in enumerate(acc):
      out_ref[ch, k, cols] = a.sum(0)

  # The border rows and columns of this program's images (ch, ch + chunks, ...), in the
  # same launch (as XLA slices and sums they were 12 more kernels per block: aot), into
  # the rows after the lags' (one output: XLA sums the chunks in one reduction, where a
  # second output took a second; aot, 2026-12-05). One loop per side, with that side's
  # 8 running channel vectors (223 registers with the four sides in one loop, 255 with
  # spills for 32 running vectors), over pieces of at most m positions (the dot form:
  # 64): a kernel's registers are those of its largest live set, and whole sides of a
  # stage-1 image (64 positions) took the element-wise form 80 registers where its lags
  # alone take 48; on the H200, 96, which left 5 programs per SM (NOTES.md, experiment
  # 22). The images' sides laid end to end in the dot form (experiment 58): at stage
  # 4 a program sums 8 images' sides of 7 positions, and the compiler unrolled a loop
  # over them into 96 load rounds a thread in turn, 0.25 ms a launch by the latency
  # model; laid end to end, 0.06.
  # (Summing into the output as it goes would read back what other threads stored, with
  # no barrier between.)
  per = -(-plan["b"] // plan["chunks"])  # images a program sums the sides of
  # The dot form lays all of them end to end, in pieces of up to 64 positions: its
  # registers are its products' (186 at 32 pixels), which a side of 64 does not raise.
  # The element-wise form keeps a loop over the images, each side in pieces of m: laid
  # end to end (the position's image and place by a division), ptxas scheduled its lags'
  # loop with two more waits for loads a trip (56 registers either way; compiled with
  # contraction, as the step is), and pieces of 64 took 96 registers.
  group, most = (1, m) if dot_dtype is None else (per, max(m, BORDER_DOT_PIECE))

  def border(first, step, size):
    span = group * size  # positions along the sides, image k's at k * size ...
    length = min(most, pl.next_power_of_2(span))
    at = lax.broadcasted_iota(jnp.int32, (length,), 0)

    def images(g, acc):  # the sides of images g * group ... (g + 1) * group - 1
      def piece(p, acc):
        i = p * length + at
        pos, k = (i, 0) if group == 1 else (i % size, i // size)  # image k's, place
        img = ch + (g * group + k) * plan["chunks"]
        live = img < plan["b"]
        if group > 1:  # (one image: pos + shift < size below says as much)
          live = live & (i < span)
        base = jnp.minimum(img, plan["b"] - 1) * (h * w) + first

        def strip(shift):  # u at positions pos + shift, 0 past the side (or the batch)
          ok = live & (pos + shift < size)
          row = base + jnp.minimum(pos + shift, size - 1) * step + plan["guard"]
          return jnp.where(ok[:, None], u_ref[row, cols].astype(F32), 0.0)
        v = strip(0)
        head, tail = (jnp.where((pos == end)[:, None], v, 0.0) for end in (0, size - 1))
        terms = [v.sum(0)] + [(v * (v if s == 0 else strip(s))).sum(0) for s in range(3)]
        terms += [head.sum(0), (head * head).sum(0), tail.sum(0), (tail * tail).sum(0)]
        return tuple(a + t for a, t in zip(acc, terms))
      return lax.fori_loop(0, -(-span // length), piece, acc)
    return lax.fori_loop(0, -(-per // group), images,
                         tuple(jnp.zeros((bj,), F32) for _ in range(8)))
  # (first pixel, step, length) of each side within its image
  sides = {"top": (0, 1, w), "bottom": ((h - 1) * w, 1, w), "left": (0, w, h),
           "right": (w - 1, w, h)}
  for s, side in enumerate(BORDER_SIDES):
    for r, a in enumerate(border(*sides[side])):
      out_ref[ch, 1 + len(LAGS) + s * 8 + r, cols] = a


# The border terms after lag_sums' 14 rows, 8 per side: u's sum and its lag-0, 1 and 2
# products along the side, then its first and last pixel's value and square (the
# corners; used for the columns only).
BORDER_SIDES = ("top", "bottom", "left", "right")
BORDER_ROWS = 8 * len(BORDER_SIDES)
# The dot form's lag kernel sums its images' sides in pieces of this many positions,
# or of the tiling's pixels where more (:func:`_lags_kernel`): 64 holds a program's 56
# at every stage of Eq.(3) at batch 256 (experiment 58).
BORDER_DOT_PIECE = 64


def lag_sums(u: jax.Array, interpret: bool | None = None, dot: bool = False) -> jax.Array:
  """``(14 + 32, n)`` float32 over the whole image (B, H, W, n): the sum of u, then the
  sums of u(q) u(q + d) for d in :data:`LAGS` (zero outside the image), then the border
  terms (:data:`BORDER_SIDES`: along row 0, row H-1, column 0 and column W-1, u's sum,
  its lag-0, 1, 2 products, its first and last value and square), summed over the
  batch. One launch; its tiling is QLHS_STENCIL_TILING's
  ``stats`` entry (its splits unused). ``dot``: the lag products as matrix products
  (:func:`_lags_dot_loop`; no row walk), at the ``stats_dot`` entry (pixels, channels,
  warps, stages)."""
  interpret = _interpret(interpret, "QLHS_STATS_FORM")
  n = u.shape[-1]
  check(n, "QLHS_STATS_FORM", interpret=interpret)
  walk = not dot and _walks_rows("stats", 1)
  if dot:
    m0, bj0, warps, stages = tiling("stats_dot")
  else:
    (m0, bj0, warps, _), stages = tiling("stats", walk), 1
  if walk:
    plan = _rows_plan(*u.shape[:3], n, 1, m0, bj0, interpret)
    part = _rows_call(
        _lags_rows_kernel, plan, "lags", warps, interpret,
        jax.ShapeDtypeStruct((_rows_programs(plan), 1 + len(LAGS) + BORDER_ROWS, n), F32),
        _rows_pad(u.reshape(-1, n), plan))
    return _total(part)
  plan, u2 = lean_plan(_chunked_plan(u.shape, 1, m0, bj0), u.reshape(-1, n), interpret)
  chunks = plan["chunks"]
  dot_dtype = None
  if dot:
    _dot_tiles(plan, "QLHS_STATS_FORM", interpret)
    dot_dtype = jnp.bfloat16 if u.dtype == jnp.bfloat16 else F32
  part = pl.pallas_call(
      functools.partial(_lags_kernel, plan=plan, dot_dtype=dot_dtype),
      out_shape=jax.ShapeDtypeStruct((chunks, 1 + len(LAGS) + BORDER_ROWS, n), F32),
      grid=_grid(plan, chunks, n // plan["bj"]), interpret=interpret,
      name=NAMES["lags_dot" if dot else "lags"],
      **_params(warps, interpret, stages))(u2)
  return _total(part)


def stats_from_lags(full: jax.Array) -> jax.Array:
  """The (54, n) tap sums and Gram entries of :func:`tap_stats` at stride 1 from
  :func:`lag_sums`' (46, n) sums.

  Over the output pixels p, sum_p u(p+a) u(p+b) = S_d - sum over the ring R (the pixels
  just outside the image) of u(p+a) u(p+b). On R's top row (y = -1, x = -1..W) only taps
  with dy = +1 land inside, on u's row 0, and x runs over the whole row: the term is
  row 0's sum of u(x) u(x + |bx - ax|). Likewise the bottom row (row H-1, dy = -1). On
  R's left column (x = -1, y = 0..H-1; the corners belong to the rows) taps with dx = +1
  read u's column 0 at y + ay and y + by: the column's lag-|by - ay| sum, less its last
  square where both dy are -1 (y + ay never reaches H-1) and its first where both are
  +1. The right column likewise. The tap sums: sum of u less the border rows and
  columns that the tap's pixels never reach, the corners counted once."""
  from qlhs_jax.kernels.d_bn_product import _PAIRS
  rows = iter(full[1 + len(LAGS):])
  total, lagged, end = {}, {}, {}
  for side in BORDER_SIDES:
    total[side], *lagged[side] = (next(rows) for _ in range(4))
    for y in (1, -1):  # the first (a column's y = 0) and last (y = H-1) pixel
      end[side, y] = (next(rows), next(rows))
  s, sd = full[0], full[1:1 + len(LAGS)]
  out = []
  for t in range(9):
    ay, ax = _offset(t)
    v = s
    if ay != 0:
      v = v - total["top" if ay == 1 else "bottom"]
    if ax != 0:
      side = "left" if ax == 1 else "right"
      v = v - total[side] + (end[side, ay][0] if ay != 0 else 0.0)
    out.append(v)
  for a, b in _PAIRS:
    (ay, ax), (by, bx) = _offset(a), _offset(b)
    d = (by - ay, bx - ax)
    v = sd[LAGS.index(d if d in LAGS else (-d[0], -d[1]))]
    if ay == by != 0:
      v = v - lagged["top" if ay == 1 else "bottom"][abs(bx - ax)]
    if ax == bx != 0:
      side = "left" if ax == 1 else "right"
      v = v - lagged[side][abs(by - ay)] + (end[side, ay][1] if ay == by != 0 else 0.0)
    out.append(v)
  return jnp.stack(out)


# ------------------------------------------------------------------------------------
# Pass 3's sums of fuse_d_bn="xla": BatchNorm's backward and dL/dkernel's tap products.

def _sums_tile(plan, ti, cols, c_ref, dp_ref, u_ref=None, cwb=None, awb=None):
  """Pass 3's tile ``ti`` (:class:`eq3_block._Tile`, its taps' loads) and g = dp * c
  there, (m, hidden channels ``cols``) float32; with ``cwb`` (C's columns ``cols``) c
  made from u there (:func:`_c_tile`), not read; with ``awb`` (A's transpose at
  ``cols``) dp made from dy, ``dp_ref`` (:func:`_dp_tile`)."""
  from qlhs_jax.kernels.eq3_block import _Tile  # the same tap loads as eq3_block's
  m = plan["m"]
  p0 = jnp.minimum(ti, plan["tiles"] - 1) * m
  tile = _Tile(p0, plan)
  # Rows past the last pixel (and tiles past the end) count nothing: g is 0 there.
  live = (ti * m + lax.broadcasted_iota(jnp.int32, (m,), 0) < plan["rows"])[:, None]
  pix = pl.ds(p0, m)
  c = (c_ref[pix, cols].astype(F32) if cwb is None else _c_tile(tile, u_ref, cwb))
  dp = dp_ref[pix, cols].astype(F32) if awb is None else _dp_tile(pix, dp_ref, awb)
  g = jnp.where(live, dp * c, 0.0)
  return tile, g


def _bn_sums_kernel(u_ref, c_ref, dp_ref, *refs, plan, xhat):
  m, bj, e, tpc = plan["m"], plan["bj"], plan["e"], plan["tpc"]
  ch, cb = _ids(plan)
  j0 = cb * bj
  cols = pl.ds(j0 * e, bj * e)  # the block's hidden channels j*e + s, contiguous
  wide = lambda v: jnp.broadcast_to(v[:, :, None], (m, bj, e)).reshape(m, bj * e)
  if xhat:  # the kernel before 2026-12-04 (QLHS_SUMS_FORM=pallas_xhat)
    k_ref, mean_ref, rstd_ref, out_ref = refs
    mean, rstd = mean_ref[cols][None, :], rstd_ref[cols][None, :]
  else:
    (out_ref,) = refs

  def body(i, acc):
    tile, g = _sums_tile(plan, ch * tpc + i, cols, c_ref, dp_ref)
    if not xhat:
      # Each tap widened, multiplied and dropped: no D u, no tap kept live.
      return (acc[0] + g, *(acc[1 + t] + wide(tile.tap(u_ref, t, j0, bj)) * g
                            for t in range(9)))
    # D u from the nine taps, then g * xhat: 11 running sums.
    taps = [wide(tile.tap(u_ref, t, j0, bj)) for t in range(9)]  # (m, bj*e) each
    x = taps[0] * k_ref[0, cols][None, :]
    for t in range(1, 9):
      x += taps[t] * k_ref[t, cols][None, :]
    return (acc[0] + g, acc[1] + g * ((x - mean) * rstd),
            *(a + tap * g for a, tap in zip(acc[2:], taps)))
  acc = lax.fori_loop(0, tpc, body, tuple(jnp.zeros((m, bj * e), F32)
                                          for _ in range(out_ref.shape[1])))
  for k, a in enumerate(acc):
    out_ref[ch, k, cols] = a.sum(0)


def _bn_sums_dot_kernel(u_ref, c_ref, dp_ref, *refs, plan, split):
  """:func:`_bn_sums_kernel`'s ten sums as matrix products over the tile's pixels: per
  tap, tap_t(u)^T (bj input channels, m) @ g (m, bj*e hidden channels), of which only
  the entries where the row is the hidden channel's own input channel (1 in bj) are
  kept, at the end; the sum of g is summed element-wise (as g^T @ a column of ones it
  took 2 more products and a wait a trip; experiment 44). The tensor cores have the
  throughput to waste (at stage 1, 118 GFLOP a launch: 0.12 ms at an H100's dense
  bfloat16 rate, of which mma.sync reaches a part; the copy time 0.31), and what the
  products buy is Triton's pipeliner: loads that feed a dot are issued ``stages - 1``
  trips ahead as asynchronous copies to shared memory (cp.async), where the
  element-wise kernel waits once a trip with 16 warps an SM to cover it
  (benchmarks/NOTES.md, experiments 39, 40).
  With bj = 16 rows the products are mma.sync (HMMA), which need no wait; as g^T @ tap
  (bj*e = 64 rows) they were Hopper's asynchronous wgmma, and a tap's product of more
  than 16 pixels is several wgmma, chained through a register copy that ptxas made
  wait for the one before: 9 waits a trip (experiment 45).
  ``split``: bfloat16 inputs, g = dp * c (16 significant bits, exact in float32) as the
  sum of two bfloat16 halves, each product exact and summed in float32, as the
  element-wise kernel's; else float32 operands at HIGHEST (Triton: IEEE, not TF32).
  The taps go into the products as loaded (``_Tile.operand``): from the pipeliner's
  buffers, 3 barriers a trip (5 as wgmma); loaded in float32 and cast back, each went
  through the warps into a second buffer first, 22 (experiment 44).
  ``plan["c_in_kernel"]``: ``c_ref`` is C's weight and c is made from u at each tile
  (:func:`_c_tile`; QLHS_C_FORM=kernels). ``plan["dp_in_kernel"]``: ``dp_ref`` is dy,
  followed by A's transpose, and dp is made from them at each tile (:func:`_dp_tile`;
  QLHS_DP_FORM=kernels)."""
  from qlhs_jax.kernels.eq3_block import _dot
  m, bj, e, tpc = plan["m"], plan["bj"], plan["e"], plan["tpc"]
  ch, cb = _ids(plan)
  j0 = cb * bj
  cols = pl.ds(j0 * e, bj * e)  # the block's hidden channels j*e + s, contiguous
  a_ref, (out_ref,) = (refs[0], refs[1:]) if plan.get("dp_in_kernel") else (None, refs)
  cwb, awb = _c_columns(plan, c_ref, cols), _dp_columns(plan, a_ref, cols)
  low = jnp.bfloat16 if split else F32
  # u's channels in the block (in runs of 8 bytes with QLHS_TAP_COPY=l1)
  taps = j0 + _tap_runs(lax.broadcasted_iota(jnp.int32, (1, bj), 1), bj, u_ref.dtype)

  def add(acc, a, parts):  # acc + a^T @ g, over the tile's pixels
    for b in parts:
      acc = acc + _dot(a, b, ta=True)
    return acc

  def body(i, acc):
    tile, g = _sums_tile(plan, ch * tpc + i, cols, c_ref, dp_ref, u_ref, cwb, awb)
    if split:
      hi = g.astype(low)
      parts = (hi, (g - hi.astype(F32)).astype(low))
    else:
      parts = (g,)
    return (acc[0] + g,
            *(add(acc[1 + t], tile.operand(u_ref, *_offset(t), taps).astype(low), parts)
              for t in range(9)))
  acc = lax.fori_loop(0, tpc, body, (jnp.zeros((m, bj * e), F32),)
                      + tuple(jnp.zeros((bj, bj * e), F32) for _ in range(9)))
  # hidden channel j*e + s, input channel j
  _store_own(out_ref, ch, cols, jnp.sum(acc[0], axis=0), acc[1:], e)


def bn_sums(u: jax.Array, c5: jax.Array | None, dp5: jax.Array, k9: jax.Array,
            mean: jax.Array, rstd: jax.Array, stride: int, interpret: bool | None = None,
            xhat: bool = False, dot: bool = False, cw: jax.Array | None = None,
            aw: jax.Array | None = None):
  """Pass 3's sums of ``d_bn_product``'s "xla" path with g = dp * c over the output
  pixels: ``(sg, sgx, tg)``, the sums of g, of g * xhat (xhat = (D u - mean) * rstd)
  and of tap_t(u) * g, shaped (1, n, e), (1, n, e) and (1, n, 9, e) float32 like
  ``d_bn_product._xla_backward_sums``'s. ``u`` (B, H, W, n), ``c5``/``dp5`` (B, Ho, Wo,
  n, e), ``k9`` (9, n, e), ``mean``/``rstd`` (1, n, e).

  The kernel sums g and the nine tap_t * g, and no D u: since D u = sum_t k_t tap_t,
  sum(g * xhat) = rstd * (sum_t k_t sum(tap_t g) - mean * sum(g)). Each pixel and
  hidden channel takes 9 multiply-adds and 10 running sums instead of 18 and 11 (D u's
  nine taps, then xhat); before 2026-12-04 it summed g * xhat itself (benchmarks/NOTES.md,
  experiment 23). Float32 cancellation: like the statistics' k^T M k (and
  ``d_bn_product._xla_kernel_grad``), large only where D u is much smaller than u's
  taps; tests/kernels checks a zero-sum kernel on u offset by 100 standard deviations
  against float64. ``xhat``: the kernel as it was, summing g * xhat from D u
  (QLHS_SUMS_FORM=pallas_xhat), kept to time against this one in one call. ``dot``: the
  same sums as matrix products (QLHS_SUMS_FORM=pallas_dot, :func:`_bn_sums_dot_kernel`,
  tiles from QLHS_STENCIL_TILING's ``sums_dot`` entry: pixels, channels, warps, stages;
  no row walk; ``xhat`` then unused). ``cw`` (n, n*e) in place of ``c5`` (None), with
  ``dot``: c = subsample(u) @ cw made in the kernel, never read (QLHS_C_FORM=kernels).
  ``aw`` (n*e, n_out), with ``dot``: ``dp5`` is dy (B, Ho, Wo, n_out), the gradient of
  y = p @ aw, and dp = dy @ aw^T is made in the kernel, never read
  (QLHS_DP_FORM=kernels)."""
  interpret = _interpret(interpret, "QLHS_SUMS_FORM")
  n, e = u.shape[-1], k9.shape[-1]
  check(n, "QLHS_SUMS_FORM", interpret=interpret, e=e)
  if not dot:
    _refuse_made(cw, aw, "pass 3's kernel", "its dot form: QLHS_SUMS_FORM=pallas_dot")
  xhat = xhat and not dot
  walk = not (xhat or dot) and _walks_rows("sums", stride)
  if dot:
    m0, bj0, warps, stages = tiling("sums_dot")
  else:
    (m0, bj0, warps), stages = tiling("sums", walk), 1
  if walk:
    plan = _rows_plan(*u.shape[:3], n, e, m0, bj0, interpret)
    flat = lambda v: _rows_pad(v.reshape(-1, v.shape[-2] * v.shape[-1]), plan)
    part = _rows_call(
        _bn_sums_rows_kernel, plan, "sums", warps, interpret,
        jax.ShapeDtypeStruct((_rows_programs(plan), 10, n * e), F32),
        _rows_pad(u.reshape(-1, n), plan), flat(c5), flat(dp5))
    return _sums_out(_total(part).reshape(10, n, e), k9, mean, rstd)
  plan, u2 = lean_plan(dict(_chunked_plan(u.shape, stride, m0, bj0), e=e),
                       u.reshape(-1, n), interpret)
  from qlhs_jax.kernels.eq3_block import _pad_rows
  rows, chunks, bj = plan["rows"], plan["chunks"], plan["bj"]
  # c and dp (or dy) as rows of channels, padded to the tiles' end (none at batch 256).
  flat = lambda v: _pad_rows(v.reshape(rows, -1), plan)
  vectors = ([k9.astype(F32).reshape(9, n * e), mean.astype(F32).reshape(n * e),
              rstd.astype(F32).reshape(n * e)] if xhat else [])
  count = 11 if xhat else 10
  if dot:
    _dot_tiles(plan, "QLHS_SUMS_FORM", interpret)
    plan["c_in_kernel"], plan["dp_in_kernel"] = cw is not None, aw is not None
    kernel = functools.partial(_bn_sums_dot_kernel, plan=plan, split=all(
        a.dtype == jnp.bfloat16 for a in (u, c5 if cw is None else cw,
                                          dp5 if aw is None else aw)))
  else:
    kernel = functools.partial(_bn_sums_kernel, plan=plan, xhat=xhat)
  part = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((chunks, count, n * e), F32),
      grid=_grid(plan, chunks, n // bj), interpret=interpret,
      name=NAMES["sums_dot" if dot else "sums"],
      **_params(warps, interpret, stages))(u2, flat(c5) if cw is None else cw, flat(dp5),
                                           *([] if aw is None else [aw.T]), *vectors)
  sums = _total(part).reshape(count, n, e)
  if xhat:
    return sums[0][None], sums[1][None], jnp.moveaxis(sums[2:], 0, 1)[None]
  return _sums_out(sums, k9, mean, rstd)


def _sums_out(sums, k9, mean, rstd):
  """:func:`bn_sums`' three sums from the kernel's (10, n, e): g's, then tap_t * g's."""
  sg, tg = sums[0], sums[1:]  # (n, e), (9, n, e)
  # At HIGHEST: no TF32 dot on the GPU (d_bn_product._stats_from_sums). (Written as a sum
  # of products instead, XLA fused the step's small kernels differently: 12 more.)
  sgx = rstd[0] * (jnp.einsum("tne,tne->ne", k9.astype(F32), tg,
                              precision=lax.Precision.HIGHEST) - mean[0] * sg)
  return sg[None], sgx[None], jnp.moveaxis(tg, 0, 1)[None]


# ------------------------------------------------------------------------------------
# du = D^T dx.

def _du_kernel(dx_ref, k_ref, *rest, plan):
  *add_refs, du_ref = rest  # (the addends' refs, then du's)
  m, bj, e, st = plan["m"], plan["bj"], plan["e"], plan["stride"]
  ti, cb = _ids(plan)
  p0, j0 = ti * m, cb * bj
  cols = pl.ds(j0 * e, bj * e)  # hidden channels j*e + s of the block, contiguous
  acc = jnp.zeros((m, bj * e), F32)
  if plan.get("lean"):
    # Stride 1: input pixel p receives tap (dy, dx) from output pixel p - (dy, dx).
    from qlhs_jax.kernels.eq3_block import _Tile
    tile = _Tile(p0, plan)  # tiles of the input pixels, here also the output's
    for t in range(9):
      dy, dx = t // 3 - 1, t % 3 - 1
      v = tile.shifted(dx_ref, -dy, -dx, cols, tile.inside(-dy, -dx))
      acc += v * k_ref[t, cols][None, :]
  else:
    pix = jnp.minimum(p0 + lax.broadcasted_iota(jnp.int32, (m,), 0), plan["rows"] - 1)
    x = pix % plan["w"]
    y = (pix // plan["w"]) % plan["h"]
    img = pix // (plan["h"] * plan["w"])
    for t in range(9):
      # Output pixel (oy, ox) reads input (st*oy + dy, st*ox + dx) for tap t: input pixel
      # (y, x) receives from oy = (y - dy) / st where that divides and lands in range.
      dy, dx = t // 3 - 1, t % 3 - 1
      ny, nx = y - dy, x - dx
      nyc, nxc = jnp.maximum(ny, 0), jnp.maximum(nx, 0)
      oy, ox = nyc // st, nxc // st
      ok = ((ny >= 0) & (nx >= 0) & (oy < plan["ho"]) & (ox < plan["wo"])
            & (nyc % st == 0) & (nxc % st == 0))
      row = jnp.clip(img * (plan["ho"] * plan["wo"]) + oy * plan["wo"] + ox, 0,
                     plan["b"] * plan["ho"] * plan["wo"] - 1)
      v = dx_ref[row, cols].astype(F32)
      acc += jnp.where(ok[:, None], v, 0.0) * k_ref[t, cols][None, :]
  du = acc.reshape(m, bj, e).sum(2)
  for add_ref in add_refs:
    du += add_ref[pl.ds(p0, m), pl.ds(j0, bj)].astype(F32)
  du_ref[pl.ds(p0, m), pl.ds(j0, bj)] = du.astype(du_ref.dtype)


# D's kernel in the products of du and of D u (QLHS_DU_FORM / QLHS_PRODUCT_FORM=
# pallas_dot) with bfloat16 operands: the parts of each value (the last zero), side by
# side along one side of one product (:func:`_k_block`).
K_PARTS = 4


def _k_parts(x_dtype, k_dtype) -> int:
  """The parts of D's kernel in the products of an input (dx or u) in ``x_dtype``
  (:func:`_k_block`): :data:`K_PARTS` for a bfloat16 input and a float32 kernel, so that
  every product is exact; else 1: a float32 input (float32 operands at HIGHEST), or a
  kernel given in bfloat16 (its own one part: QLHS_D_KERNEL=compute)."""
  return K_PARTS if x_dtype == jnp.bfloat16 and k_dtype != jnp.bfloat16 else 1


def _parts_channels(e: int, parts: int) -> int:
  """The fewest input channels a block of the parts' products (:func:`_k_block`) needs
  for sides of at least tl.dot's smallest: bj*e hidden channels and bj*P parts."""
  return -(-DOT_MIN // min(e, parts))


def _k_block(k, e: int, bj: int, parts: int, dtype, forward: bool = False):
  """One tap of D's kernel, ``k`` (bj*e,) float32 over a block's hidden channels
  (j*e + s), as the right operand of du's product (:func:`_du_dot_kernel`): (bj*e,
  bj*P), P = ``parts`` (:func:`_k_parts`), column j*P + q holding part q of the hidden
  channels of input channel j, 0 in the others' rows, in ``dtype`` (the input's).
  P = :data:`K_PARTS`: the value as three bfloat16 parts that add up to it exactly (8
  significant bits each, 24 in all, so that every product with a bfloat16 value is
  exact in float32) and a zero; P = 1: the value itself (in float32 at HIGHEST, or a
  kernel exact in bfloat16). One product of P columns a block, not P products:
  compiled for the H100, three products a tap each waited for the last, and the
  second and third took their left operand through shared memory again (a store, a
  barrier, a load). ``forward``: the right operand of D u's product instead
  (:func:`_dot_d`), (P*bj, bj*e), row q*bj + j holding part q of input channel j's
  hidden channels."""
  shape = (parts * bj, bj * e) if forward else (bj * e, bj * parts)
  hidden_axis = 1 if forward else 0
  hid = lax.broadcasted_iota(jnp.int32, shape, hidden_axis)
  part = lax.broadcasted_iota(jnp.int32, shape, 1 - hidden_axis)
  q, j = (part // bj, part % bj) if forward else (part % parts, part // parts)
  value = rest = jnp.broadcast_to(k[None, :] if forward else k[:, None], shape)
  if parts > 1:  # parts 0-2 where q = 0-2, the last zero
    value = jnp.zeros(shape, F32)
    for qi in range(K_PARTS - 1):
      piece = rest.astype(jnp.bfloat16).astype(F32)
      value = jnp.where(q == qi, piece, value)
      rest = rest - piece
  return jnp.where(hid // e == j, value, 0.0).astype(dtype)


def _du_dot_kernel(dx_ref, k_ref, *rest, plan, parts):
  """:func:`_du_kernel` at stride 1 as matrix products (QLHS_DU_FORM=pallas_dot): per
  tap, dx at the shifted pixels (m, bj*e hidden channels) @ the tap's kernel as a
  block-diagonal matrix (:func:`_k_block`: hidden channel j*e + s feeds input channel
  j, so 1 in bj products is kept), summed over the taps and then over each input
  channel's P columns, over ``tpc`` tiles a program (the blocks built once). The
  tensor cores take the multiply-adds, half the element-wise kernel's instructions at
  stage 1; at more than one stage Triton's pipeliner also issues the loop's loads of
  dx trips ahead, as asynchronous copies, though past L1 (benchmarks/NOTES.md,
  experiment 41). ``parts`` of D's kernel (:func:`_k_parts`): with bfloat16 dx every
  product is exact and summed in float32, as in the element-wise kernel (in another
  order); float32 dx: float32 operands at HIGHEST."""
  from qlhs_jax.kernels.eq3_block import _Tile, _dot
  *add_refs, du_ref = rest  # (the addends' refs, then du's)
  m, bj, e, tiles, tpc = plan["m"], plan["bj"], plan["e"], plan["tiles"], plan["tpc"]
  ch, cb = _ids(plan)
  j0 = cb * bj
  cols = pl.ds(j0 * e, bj * e)  # hidden channels j*e + s of the block, contiguous
  blocks = [_k_block(k_ref[t, cols], e, bj, parts, dx_ref.dtype) for t in range(9)]
  # QLHS_TAP_COPY=l1: dx's taps as a gathered load in runs of 8 bytes, through L1
  gather = _split_taps(bj * e, dx_ref.dtype)
  runs = j0 * e + _tap_runs(lax.broadcasted_iota(jnp.int32, (1, bj * e), 1), bj * e,
                            dx_ref.dtype)

  def body(i, carry):
    ti = jnp.minimum(ch * tpc + i, tiles - 1)  # the last chunk's extra trips: its last tile
    tile = _Tile(ti * m, plan)  # tiles of the input pixels, here also the output's
    acc = jnp.zeros((m, bj * parts), F32)
    for t in range(9):
      # Input pixel p receives tap (dy, dx) from output pixel p - (dy, dx).
      dy, dx = _offset(t)
      v = (tile.operand(dx_ref, -dy, -dx, runs) if gather else
           tile.shifted(dx_ref, -dy, -dx, cols, tile.inside(-dy, -dx)))
      acc = acc + _dot(v.astype(blocks[t].dtype), blocks[t])
    du = acc.reshape(m, bj, parts).sum(2) if parts > 1 else acc
    rows = pl.ds(ti * m, m)
    for add_ref in add_refs:
      du = du + add_ref[rows, pl.ds(j0, bj)].astype(F32)
    du_ref[rows, pl.ds(j0, bj)] = du.astype(du_ref.dtype)
    return carry
  lax.fori_loop(0, tpc, body, 0)


def _du_parity_kernel(dx_ref, k_ref, *rest, plan):
  """du at stride 2 for one parity class (py, px) of the input pixels: (y, x) = (2a +
  py, 2b + px). Along an axis an even pixel receives one tap (d = 0, from output a), an
  odd one two (d = -1 from output a + 1, d = +1 from output a), so a class needs at most
  four of the nine taps, which the general stride's kernel loads and masks for every
  pixel. The class's pixels run over the output grid's (image, a, b), so each tap's rows
  are m contiguous rows at a per-program offset (a masked load, as in lean tiles); du is
  stored to the class's scattered rows, masked where 2a + py or 2b + px leaves the
  image (odd sizes)."""
  *add_refs, du_ref = rest  # (the addends' refs, then du's)
  from qlhs_jax.kernels.d_bn_product import plt
  m, bj, e = plan["m"], plan["bj"], plan["e"]
  h, w, ho, wo = plan["h"], plan["w"], plan["ho"], plan["wo"]
  pid, cb = _ids(plan)
  j0 = cb * bj
  cls, q0 = lax.div(pid, plan["ctiles"]), lax.rem(pid, plan["ctiles"]) * m
  py, px = lax.div(cls, 2), lax.rem(cls, 2)
  cols = pl.ds(j0 * e, bj * e)
  q = q0 + lax.broadcasted_iota(jnp.int32, (m,), 0)
  b_, a_ = lax.rem(q, wo), lax.rem(lax.div(q, wo), ho)
  y, x = 2 * a_ + py, 2 * b_ + px
  valid = (q < plan["q"]) & (y < h) & (x < w)
  # Per axis, slot 0: tap d = -parity from output a + parity (in range below the last
  # output row or column); slot 1: tap d = +1 from output a, odd parity only.
  ys = ((-py, py, a_ + py < ho), (1, 0, py == 1))
  xs = ((-px, px, b_ + px < wo), (1, 0, px == 1))
  acc = jnp.zeros((m, bj * e), F32)
  for dy, oy, ok_y in ys:
    for dx, ox, ok_x in xs:
      v = plt.load(dx_ref.at[pl.ds(q0 + oy * wo + ox, m), cols],
                   mask=(valid & ok_y & ok_x)[:, None], other=0.0)
      acc += v.astype(F32) * k_ref[3 * (dy + 1) + dx + 1, cols][None, :]
  du = acc.reshape(m, bj, e).sum(2)
  rows = lax.div(q, ho * wo) * (h * w) + y * w + x
  at = (rows[:, None], (j0 + lax.broadcasted_iota(jnp.int32, (bj,), 0))[None, :])
  for add_ref in add_refs:
    du += plt.load(add_ref.at[at], mask=valid[:, None], other=0.0).astype(F32)
  plt.store(du_ref.at[at], du.astype(du_ref.dtype), mask=valid[:, None])


def d_transpose(dx: jax.Array, k9: jax.Array, stride: int, hw: tuple[int, int],
                addends: Sequence[jax.Array] = (), out_dtype=F32,
                interpret: bool | None = None, dot: bool = False) -> jax.Array:
  """du = D^T dx (+ each of ``addends``): ``dx`` (B, Ho, Wo, n, e), ``k9`` (9, n, e) D's
  kernel (tap t = 3*dy + dx), ``hw`` u's (H, W), ``addends`` arrays (B, H, W, n), added
  in the kernel (one store of du, not an XLA add that reads it back). Returns (B, H, W,
  n) in ``out_dtype``, summed in float32. ``dot``: at stride 1, the taps' sums as
  matrix products (QLHS_DU_FORM=pallas_dot, :func:`_du_dot_kernel`, tiles from
  QLHS_STENCIL_TILING's ``du_dot`` entry: pixels, channels, warps, stages; no row
  walk); at stride 2 the parity classes' kernel, as without."""
  interpret = _interpret(interpret, "QLHS_DU_FORM")
  b, ho, wo, n, e = dx.shape
  check(n, "QLHS_DU_FORM", interpret=interpret, e=e)
  h, w = hw
  dot = dot and stride == 1
  walk = not dot and _walks_rows("du", stride)
  if dot:
    m0, bj0, warps, stages = tiling("du_dot")
  else:
    (m0, bj0, warps), stages = tiling("du", walk), 1
  g = _geometry(b, h, w, stride)
  if (g["ho"], g["wo"]) != (ho, wo):
    raise ValueError(f"d_transpose: dx {dx.shape} is not the stride-{stride} output of "
                     f"an input of {hw}")
  dx2, k2 = dx.reshape(b * ho * wo, n * e), k9.astype(F32).reshape(9, n * e)
  adds = [a.reshape(b * h * w, n) for a in addends]
  if walk:
    plan = _rows_plan(b, h, w, n, e, m0, bj0, interpret)
    du = _rows_call(_du_rows_kernel, plan, "du", warps, interpret,
                    _rows_out(plan, n, out_dtype), _rows_pad(dx2, plan), k2,
                    *[_rows_pad(a, plan) for a in adds])
    return _rows_unpad(du, plan).reshape(b, h, w, n)
  if stride == 2:  # four parity classes of tiles of the output grid (_du_parity_kernel)
    plan = dict(g, **_tiles(b * ho * wo, n, m0, bj0), e=e)
    plan.update(q=plan["rows"], ctiles=plan["tiles"])
    body, programs, out_rows = _du_parity_kernel, 4 * plan["ctiles"], b * h * w
  elif dot:  # chunks of tpc tiles a program: the blocks built once, the loads pipelined
    plan, dx2 = lean_plan(dict(_chunked_plan((b, h, w, n), 1, m0, bj0), e=e), dx2,
                          interpret)
    # Three parts of D's kernel for a bfloat16 dx whatever its dtype (one part of a
    # bfloat16 kernel, exact too, needs 16 channels a block: 4x the left operand, dx's
    # hidden channels, for no fewer instructions a value; experiment 43).
    parts = _k_parts(dx.dtype, F32)
    _dot_tiles(plan, "QLHS_DU_FORM", interpret, _parts_channels(e, parts))
    body = functools.partial(_du_dot_kernel, parts=parts)
    programs, out_rows = plan["chunks"], plan["tiles"] * plan["m"]
  else:
    # Tiles of the input pixels; dx as rows of n*e hidden channels (j*e + s) and the
    # kernel likewise: each tap is one contiguous load of a block's bj*e channels.
    plan, dx2 = lean_plan(dict(g, **_tiles(b * h * w, n, m0, bj0), e=e), dx2, interpret)
    body, programs, out_rows = _du_kernel, plan["tiles"], plan["tiles"] * plan["m"]
  if stride == 1 and adds:
    from qlhs_jax.kernels.eq3_block import _pad_rows
    adds = [_pad_rows(a, plan) for a in adds]
  du = pl.pallas_call(
      functools.partial(body, plan=plan),
      out_shape=jax.ShapeDtypeStruct((out_rows, n), out_dtype),
      grid=_grid(plan, programs, n // plan["bj"]), interpret=interpret,
      name=NAMES["du_dot" if dot else "du"],
      **_params(warps, interpret, stages))(dx2, k2, *adds)
  return du[:b * h * w].reshape(b, h, w, n)


# ------------------------------------------------------------------------------------
# The element-wise passes of fuse_d_bn="xla" that recompute D u: the forward product and
# pass 4 (dx and dc).
#
# XLA writes them as loop fusions that evaluate each element's nine taps from padded
# slices of u; on the H100 pass 4 ran at 1.8 TB/s and the product at 1.5 (NOTES.md,
# experiment 13). Here, as in :func:`bn_sums`, a program takes m output pixels and a
# block of bj input channels (bj*e contiguous hidden channels): nine vector loads of u's
# taps per tile, one load of c (and dp) and one store per output. QLHS_PRODUCT_FORM
# selects them (d_bn_product.product_form; not yet timed, so "xla" stays the default).
#
# Both forms (XLA's and these tiles) were latency-bound in experiment 23's profile on the
# H200: a thread waits for its loads several times (experiment 39), and the product took
# 2.7x its copy time at stage 1. QLHS_PRODUCT_FORM=pallas_dot takes D u from matrix
# products instead (:func:`_dot_d`), over chunks of tiles a program, and c and dp as
# products with the identity (exact): every load of a trip then feeds a product, which
# is what Triton's pipeliner copies a trip ahead (cp.async), so a thread waits for none
# of a trip's loads (experiment 42).

def _d_of_taps(tap, k_tap, m, bj, e):
  """D u for the block's hidden channels (j*e + s) from u's nine taps, ``tap(t)`` (m,
  bj), and the kernel's, ``k_tap(t)`` (1, bj*e): (m, bj*e) float32, summed in tap
  order. Each tap is asked for where it is added: a tile's, loaded there, is not live
  with the other eight (ptxas: the product 46 registers at stage 1 this way, 54 with
  the nine loaded first)."""
  x = None
  for t in range(9):
    v = jnp.broadcast_to(tap(t)[:, :, None], (m, bj, e)).reshape(m, bj * e)
    term = v * k_tap(t)
    x = term if x is None else x + term
  return x


def _k_taps(k_ref, cols):
  """``k_tap`` for :func:`_d_of_taps`: tap t of D's kernel for hidden channels ``cols``,
  loaded where it is asked for."""
  return lambda t: k_ref[t, cols][None, :]


def _tile_d(tile, u_ref, k_ref, j0, bj, e, cols):
  """D u at the tile's pixels for hidden channels ``cols`` (the block's j*e + s):
  (m, bj*e) float32."""
  return _d_of_taps(lambda t: tile.tap(u_ref, t, j0, bj), _k_taps(k_ref, cols),
                    tile.plan["m"], bj, e)


def _dot_d(tile, u_ref, blocks, j0, bj):
  """D u at a tile's pixels as matrix products (QLHS_PRODUCT_FORM=pallas_dot): per tap,
  u's rows at the tap (m, P*bj) @ the tap's kernel (P*bj, bj*e) (``blocks``,
  :func:`_k_block` with ``forward``), summed in float32: (m, bj*e). The left operand
  is one gathered load: column q*bj + j reads channel j0 + j for every part q, so its
  runs of bj contiguous channels are what a thread copies (8 bytes at bj = 4 in
  bfloat16, which the machine code copies through L1, where the taps overlap; runs of
  at most 8 bytes at any bj with QLHS_TAP_COPY=l1, :func:`tap_copy`), with
  ``_Tile.operand``."""
  from qlhs_jax.kernels.eq3_block import _dot
  p = blocks[0].shape[0] // bj
  cols = j0 + _tap_runs(lax.rem(lax.broadcasted_iota(jnp.int32, (1, p * bj), 1), bj),
                      bj, u_ref.dtype)
  acc = None
  for t in range(9):
    v = tile.operand(u_ref, *_offset(t), cols)
    term = _dot(v.astype(blocks[t].dtype), blocks[t])
    acc = term if acc is None else acc + term
  return acc


def _each_tile(u_ref, k_ref, vec_refs, plan, out, c_ref=None, dp_ref=None, a_ref=None,
               sums=()):
  """Runs ``out(x, pix, cols, vec, load)`` for this program's tiles: x = D u at the
  tile's pixels ``pix`` for the block's hidden channels ``cols`` ((m, bj*e) float32),
  ``vec(ref)`` one of the per-channel rows ``vec_refs`` at ``cols`` (1, bj*e),
  ``load(ref)`` a hidden tensor's tile in float32. One tile, its taps summed
  element-wise (:func:`_tile_d`), each vector loaded where it is used; or with
  ``plan["dot"]`` (the parts of D's kernel, :func:`_k_parts`) a chunk
  of ``tpc`` tiles, x as products (:func:`_dot_d`), D's kernel and the vectors loaded
  once, and each hidden tile a product with the identity (exact): an operand of a
  product is what Triton's pipeliner copies ahead, so no load of a trip is waited
  for. ``c_ref``: the kernel's c, or C's weight where ``plan["c_in_kernel"]`` (dot tiles
  only), and ``load(c_ref)`` is then c = C u at the tile (:func:`_c_tile`), never read
  from memory. Likewise ``dp_ref``, dy where ``plan["dp_in_kernel"]`` (dot tiles only),
  with A's transpose ``a_ref``: ``load(dp_ref)`` is then dp = dy A^T at the tile
  (:func:`_dp_tile`).
  ``sums``: the shapes of running sums over the program's tiles (dot tiles only), which
  ``out`` then feeds: it returns one pair (a, b) a sum, each tile adding a^T @ b, and
  is given ``made`` too, the operands of c's and dp's products (u's centre tap, dy's
  tile; None where not made). Returns the sums (float32)."""
  from qlhs_jax.kernels.eq3_block import _Tile, _dot  # the same tap loads as eq3_block's
  m, bj, e = plan["m"], plan["bj"], plan["e"]
  pid, cb = _ids(plan)
  p0, j0 = pid * m, cb * bj  # (p0: the one tile's first pixel)
  cols = pl.ds(j0 * e, bj * e)
  row = lambda ref: ref[cols][None, :]
  if plan.get("dot") is None:
    pix = pl.ds(p0, m)
    x = _tile_d(_Tile(p0, plan), u_ref, k_ref, j0, bj, e, cols)
    out(x, pix, cols, row, lambda ref: ref[pix, cols].astype(F32))
    return
  blocks = [_k_block(k_ref[t, cols], e, bj, plan["dot"], u_ref.dtype, forward=True)
            for t in range(9)]
  rows = [(ref, row(ref)) for ref in vec_refs]
  vec = lambda ref: next(v for r, v in rows if r is ref)
  eye = lax.broadcasted_iota(jnp.int32, (bj * e, bj * e), 0)
  eye = eye == lax.broadcasted_iota(jnp.int32, (bj * e, bj * e), 1)

  cwb = _c_columns(plan, c_ref, cols)
  awb = _dp_columns(plan, a_ref, cols)

  def body(i, acc):  # (the last chunk's extra trips redo its last tile)
    ti = jnp.minimum(pid * plan["tpc"] + i, plan["tiles"] - 1)
    tile = _Tile(ti * m, plan)
    x = _dot_d(tile, u_ref, blocks, j0, bj)
    pix = pl.ds(ti * m, m)
    made = (None if cwb is None else _centre(tile, u_ref),
            None if awb is None else dp_ref[pix, :])

    def load(ref):
      if cwb is not None and ref is c_ref:
        return _rounded_dot(made[0], cwb)
      if awb is not None and ref is dp_ref:
        return _rounded_dot(made[1], awb)
      v = ref[pix, cols]
      return _dot(v, eye.astype(v.dtype))
    if not sums:
      out(x, pix, cols, vec, load)
      return acc
    # a redone tile adds nothing
    first = pid * plan["tpc"] + i < plan["tiles"]
    return tuple(s + jnp.where(first, _dot(a, b, ta=True), 0.0)
                 for s, (a, b) in zip(acc, out(x, pix, cols, vec, load, made)))
  return lax.fori_loop(0, plan["tpc"], body,
                       tuple(jnp.zeros(shape, F32) for shape in sums))


def _refuse_made(cw, aw, kernel: str, fix: str) -> None:
  """Refuses C's weight ``cw`` or A's ``aw`` given to a ``kernel`` that cannot make c or
  dp from them (not its dot form), naming the ``fix``."""
  if cw is not None or aw is not None:
    made, var = ("c = C u", "C") if cw is not None else ("dp = dy A^T", "DP")
    raise ValueError(f"{made} inside {kernel} (QLHS_{var}_FORM=kernels) needs {fix}")


def _c_columns(plan, c_ref, cols):
  """C's columns ``cols`` (n, bj*e), loaded once a program, where ``c_ref`` holds C's
  weight (``plan["c_in_kernel"]``, QLHS_C_FORM=kernels); else None (c_ref is c)."""
  return c_ref[:, cols] if plan.get("c_in_kernel") else None


def _centre(tile, u_ref):
  """u's centre tap at a tile's pixels, every input channel (m, n), in u's dtype: one
  masked load that feeds products."""
  every = lax.broadcasted_iota(jnp.int32, (1, u_ref.shape[-1]), 1)
  return tile.operand(u_ref, 0, 0, every)


def _rounded_dot(a, b):
  """a @ b summed in float32 and rounded to b's dtype, as a matmul's output is stored:
  (m, columns) float32."""
  from qlhs_jax.kernels.eq3_block import _dot
  return _dot(a, b).astype(b.dtype).astype(F32)


def _c_tile(tile, u_ref, cwb):
  """c = C u at a tile's pixels for the block's hidden channels (QLHS_C_FORM=kernels):
  u's centre tap, every input channel (m, n), @ C's columns ``cwb`` (n, bj*e), summed
  in float32 and rounded to C's dtype as the stored c is (a matmul's output in the
  compute dtype), (m, bj*e) float32. At stride s the centre tap is pixel (s*y, s*x), the
  1x1 map's subsampled input (``layers.subsample``)."""
  return _rounded_dot(_centre(tile, u_ref), cwb)


def _dp_columns(plan, a_ref, cols):
  """A's transpose at columns ``cols`` (n_out, bj*e), loaded once a program, where
  ``plan["dp_in_kernel"]`` (QLHS_DP_FORM=kernels); else None."""
  return a_ref[:, cols] if plan.get("dp_in_kernel") else None


def _dp_tile(pix, dy_ref, awb):
  """dp = dy A^T at a tile's output pixels ``pix`` for the block's hidden channels
  (QLHS_DP_FORM=kernels): dy's rows there, every output channel (m, n_out), @ A's
  transpose at the block's columns ``awb`` (n_out, bj*e), summed in float32 and rounded
  to A's dtype as the stored dp is (the matmul of the map's transpose, in the compute
  dtype), (m, bj*e) float32. dy is read at the output pixels, where the hidden tensors
  are: no tap, no stride."""
  return _rounded_dot(dy_ref[pix, :], awb)


def _product_kernel(u_ref, c_ref, k_ref, mul_ref, add_ref, p_ref, *, plan):
  # (c_ref: C's weight where plan["c_in_kernel"], QLHS_C_FORM=kernels)
  def out(x, pix, cols, vec, load):
    f1 = x * vec(mul_ref) + vec(add_ref)
    p_ref[pix, cols] = (f1 * load(c_ref)).astype(p_ref.dtype)
  _each_tile(u_ref, k_ref, (mul_ref, add_ref), plan, out, c_ref)


def _dx_dc_kernel(u_ref, c_ref, dp_ref, *refs, plan):
  # (dp_ref: dy, followed by A's transpose, where plan["dp_in_kernel"],
  # QLHS_DP_FORM=kernels)
  a_ref, refs = (refs[0], refs[1:]) if plan.get("dp_in_kernel") else (None, refs)
  k_ref, mul_ref, add_ref, cx_ref, c0_ref, mean_ref, dx_ref, dc_ref, *grad_refs = refs
  # grad_refs (plan["w_grads"]): this program's sums of C's and A's gradients

  def out(x, pix, cols, vec, load, made=None):
    mul, dp, c = vec(mul_ref), load(dp_ref), load(c_ref)
    g = dp * c
    dx = g * mul + (x - vec(mean_ref)) * vec(cx_ref) + vec(c0_ref)
    dx_ref[pix, cols] = dx.astype(dx_ref.dtype)
    f1 = x * mul + vec(add_ref)
    dc = (dp * f1).astype(dc_ref.dtype)
    dc_ref[pix, cols] = dc
    if made is not None:  # dC += u^T dc; dA += p^T dy, p = f1 * c as the forward's
      return (made[0], dc), ((f1 * c).astype(dc.dtype), made[1])
  if not plan.get("w_grads"):
    _each_tile(u_ref, k_ref, (mul_ref, add_ref, cx_ref, c0_ref, mean_ref), plan, out,
               c_ref, dp_ref, a_ref)
    return
  n, n_out = u_ref.shape[-1], a_ref.shape[0]
  bje = plan["bj"] * plan["e"]
  dcw, daw = _each_tile(u_ref, k_ref, (mul_ref, add_ref, cx_ref, c0_ref, mean_ref), plan,
                        out, c_ref, dp_ref, a_ref, sums=((n, bje), (bje, n_out)))
  ch, cb = _ids(plan)
  cols = pl.ds(cb * bje, bje)
  grad_refs[0][ch, :, cols] = dcw
  grad_refs[1][ch, cols, :] = daw


def _elementwise(kernel, name, u, hidden, vectors, k9, stride, out_dtypes, form,
                 interpret, dot=False, cw=None, aw=None, w_grads=False):
  """Runs an element-wise kernel over the output pixels: ``hidden`` (B, Ho, Wo, n, e)
  tensors as rows of n*e channels (padded to the tiles' end), ``vectors`` (1, n, e)
  per-channel float32 rows; returns one (B, Ho, Wo, n, e) tensor per out dtype.
  ``dot``: D u as matrix products over chunks of tiles (:func:`_each_tile`;
  QLHS_STENCIL_TILING's ``product_dot`` entry). ``cw``: C's weight (n, n*e), which the
  kernel takes in c's place and makes c from (:func:`_c_tile`; with ``dot`` only).
  ``aw``: A's weight (n*e, n_out), where the last of ``hidden`` is dy (B, Ho, Wo, n_out)
  in dp's place: the kernel makes dp from them (:func:`_dp_tile`; with ``dot`` only).
  ``w_grads`` (with ``cw`` and ``aw``): the kernel's sums of C's and A's gradients too,
  one per chunk of tiles, (chunks, n, n*e) and (chunks, n*e, n_out) float32, returned
  after the hidden outputs."""
  interpret = _interpret(interpret, form)
  n, e = u.shape[-1], k9.shape[-1]
  check(n, form, interpret=interpret, e=e)
  if not dot:
    _refuse_made(cw, aw, "the kernel",
                 "the dot form's tiles: QLHS_PRODUCT_FORM=pallas_dot")
  if not dot and _walks_rows("product", stride):
    return _elementwise_rows(kernel, name, u, hidden, vectors, k9, out_dtypes, interpret)
  if dot:
    parts = _k_parts(u.dtype, k9.dtype)
    m0, bj0, warps, stages = (
        tiling("grads_dot") if w_grads
        else tiling("product_dot", defaults=ONE_PART_TILING if parts == 1 else None))
    plan = dict(_chunked_plan(u.shape, stride, m0, bj0), e=e)
    _dot_tiles(plan, form, interpret, _parts_channels(e, parts))
    plan["dot"], programs = parts, plan["chunks"]
  else:
    (m0, bj0, warps), stages = tiling(name), 1
    g = _geometry(*u.shape[:3], stride)  # tiles of the output pixels, as d_transpose's
    plan = dict(g, **_tiles(g["b"] * g["ho"] * g["wo"], n, m0, bj0), e=e)
    programs = plan["tiles"]
  plan["c_in_kernel"], plan["dp_in_kernel"] = cw is not None, aw is not None
  plan["w_grads"] = w_grads
  plan, u2 = lean_plan(plan, u.reshape(-1, n), interpret)
  from qlhs_jax.kernels.eq3_block import _pad_rows
  rows, m, tiles, bj = plan["rows"], plan["m"], plan["tiles"], plan["bj"]
  shape5 = (plan["b"], plan["ho"], plan["wo"], n, e)
  args = ([u2] + ([] if cw is None else [cw])
          + [_pad_rows(h.reshape(rows, -1), plan) for h in hidden]
          + ([] if aw is None else [aw.T])
          + [k9.astype(F32).reshape(9, n * e)]
          + [v.astype(F32).reshape(n * e) for v in vectors])
  sums = ((jax.ShapeDtypeStruct((programs, n, n * e), F32),
           jax.ShapeDtypeStruct((programs, n * e, aw.shape[-1]), F32)) if w_grads else ())
  outs = pl.pallas_call(
      functools.partial(kernel, plan=plan),
      out_shape=tuple(jax.ShapeDtypeStruct((tiles * m, n * e), d) for d in out_dtypes)
      + sums,
      grid=_grid(plan, programs, n // bj), interpret=interpret,
      name=NAMES[name + ("_grads" if w_grads else "") + "_dot" if dot else name],
      **_params(warps, interpret, stages))(*args)
  k = len(out_dtypes)
  return tuple(o[:rows].reshape(shape5) for o in outs[:k]) + tuple(outs[k:])


def _rows_args(plan, u, hidden, k9, vectors):
  """A walk's operands in the element-wise kernels' order: u and the ``hidden`` (B, H,
  W, n, e) tensors as padded rows (:func:`_rows_pad`), D's kernel as (9, n*e) and the
  (1, n, e) ``vectors`` as (n*e,) float32."""
  n, e = u.shape[-1], k9.shape[-1]
  return ([_rows_pad(u.reshape(-1, n), plan)]
          + [_rows_pad(x.reshape(-1, n * e), plan) for x in hidden]
          + [k9.astype(F32).reshape(9, n * e)]
          + [v.astype(F32).reshape(n * e) for v in vectors])


def _elementwise_rows(kernel, name, u, hidden, vectors, k9, out_dtypes, interpret):
  """:func:`_elementwise` at stride 1 by the row walk of ``kernel``'s twin
  (:data:`_ROWS_TWIN`)."""
  n, e = u.shape[-1], k9.shape[-1]
  m0, bj0, warps = tiling(name, rows=True)
  plan = _rows_plan(*u.shape[:3], n, e, m0, bj0, interpret)
  outs = _rows_call(_ROWS_TWIN[kernel], plan, name, warps, interpret,
                    tuple(_rows_out(plan, n * e, d) for d in out_dtypes),
                    *_rows_args(plan, u, hidden, k9, vectors))
  return tuple(_rows_unpad(o, plan).reshape(hidden[0].shape) for o in outs)


def product(u: jax.Array, c5: jax.Array | None, k9: jax.Array, mul: jax.Array,
            add: jax.Array, stride: int, interpret: bool | None = None, dot: bool = False,
            cw: jax.Array | None = None) -> jax.Array:
  """The forward product of ``d_bn_product``'s "xla" path, p = (D u * mul + add) * c,
  in c's dtype: ``u`` (B, H, W, n), ``c5`` (B, Ho, Wo, n, e), ``k9`` (9, n, e),
  ``mul``/``add`` (1, n, e) (one BatchNorm group). ``dot``: D u as matrix products
  (QLHS_PRODUCT_FORM=pallas_dot). ``cw`` (n, n*e) in place of ``c5`` (None), with
  ``dot``: c = subsample(u) @ cw, made in the kernel and never stored
  (QLHS_C_FORM=kernels)."""
  hidden, dtype = ([c5], c5.dtype) if cw is None else ([], cw.dtype)
  return _elementwise(_product_kernel, "product", u, hidden, [mul, add], k9, stride,
                      [dtype], "QLHS_PRODUCT_FORM", interpret, dot, cw)[0]


def dx_dc(u, c5, dp5, k9, mul, add, cx, c0, mean, stride, dx_dtype,
          interpret: bool | None = None, dot: bool = False, cw=None, aw=None,
          w_grads: bool = False):
  """Pass 4 of the "xla" path with dc: dx = dp*c*mul + (D u - mean)*cx + c0 in
  ``dx_dtype`` and dc = dp * (D u * mul + add) in c's dtype, (B, Ho, Wo, n, e) each
  (one BatchNorm group: the vectors are (1, n, e)). ``dot``, ``cw``: as
  :func:`product`'s. ``aw`` (n*e, n_out), with ``dot``: ``dp5`` is dy (B, Ho, Wo,
  n_out), the gradient of y = p @ aw, and dp = dy @ aw^T is made in the kernel, never
  stored (QLHS_DP_FORM=kernels). ``w_grads`` (with ``cw`` and ``aw``): also C's and A's
  gradients, u^T dc and p^T dy, summed in the kernel, (n, n*e) and (n*e, n_out) float32
  (p = BN(D u) * c made again, as the forward's product rounds it)."""
  hidden, dtype = ([c5, dp5], c5.dtype) if cw is None else ([dp5], cw.dtype)
  outs = _elementwise(_dx_dc_kernel, "dx", u, hidden, [mul, add, cx, c0, mean], k9,
                      stride, [dx_dtype, dtype], "QLHS_PRODUCT_FORM", interpret, dot, cw,
                      aw, w_grads)
  return outs[:2] + tuple(part.sum(0) for part in outs[2:])


# ------------------------------------------------------------------------------------
# The forward product with A applied in the kernel (QLHS_P_FORM=kernels): y = p @ A.

def _product_a_kernel(u_ref, cw_ref, aw_ref, k_ref, mul_ref, add_ref, y_ref, *, plan):
  """y = p @ A at each of the program's tiles, p = (D u * mul + add) * (C u) never
  stored: for each tile an inner loop over the blocks of bj input channels makes the
  block's D u (:func:`_dot_d`, D's kernel as the block's products, built a trip from its
  taps), its c (u's centre tap, loaded once a tile, @ C's columns, as :func:`_c_tile`
  makes it) and p, rounded to A's dtype as the stored p is, and adds p @ A's rows for
  the block to y's tile, (m, n_out) float32; the tile is stored once, rounded to A's
  dtype. Why a loop and not unrolled: unrolled, every block's operands are the outer
  loop's invariants, and Triton holds them all in shared memory (234 KiB asked at stage
  1 with 32 pixels a tile; an H100 has 227)."""
  from qlhs_jax.kernels.eq3_block import _Tile, _dot
  m, bj, e = plan["m"], plan["bj"], plan["e"]
  pid = pl.program_id(0)

  def each_tile(i, carry):  # (the last chunk's extra trips redo its last tile)
    ti = jnp.minimum(pid * plan["tpc"] + i, plan["tiles"] - 1)
    tile = _Tile(ti * m, plan)
    centre = _centre(tile, u_ref)

    def each_block(cb, y):
      j0 = cb * bj
      cols = pl.ds(pl.multiple_of(j0 * e, bj * e), bj * e)
      blocks = [_k_block(k_ref[t, cols], e, bj, plan["dot"], u_ref.dtype, forward=True)
                for t in range(9)]
      f1 = (_dot_d(tile, u_ref, blocks, j0, bj) * mul_ref[cols][None, :]
            + add_ref[cols][None, :])
      p = (f1 * _rounded_dot(centre, cw_ref[:, cols])).astype(aw_ref.dtype)
      return y + _dot(p, aw_ref[cols, :])
    y = lax.fori_loop(0, plan["n"] // bj, each_block,
                      jnp.zeros((m, aw_ref.shape[-1]), F32))
    y_ref[pl.ds(ti * m, m), :] = y.astype(y_ref.dtype)
    return carry
  lax.fori_loop(0, plan["tpc"], each_tile, 0)


def product_a(u: jax.Array, cw: jax.Array, aw: jax.Array, k9: jax.Array, mul: jax.Array,
              add: jax.Array, stride: int, interpret: bool | None = None) -> jax.Array:
  """y = p @ aw of the forward product p = (D u * mul + add) * c, c = subsample(u) @ cw,
  with p never stored (QLHS_P_FORM=kernels; :func:`_product_a_kernel`): ``u`` (B, H, W,
  n), ``cw`` (n, n*e) and ``aw`` (n*e, n_out) in the compute dtype, ``k9`` (9, n, e) (in
  parts where it is float32 and u bfloat16, :func:`_k_parts`; compiled for the H100 in
  one, QLHS_D_KERNEL=compute), ``mul``/``add`` (1, n, e) (one BatchNorm group). Returns
  y (B, Ho, Wo, n_out) in aw's dtype: p rounded to it as the stored p is, then p @ aw
  summed in float32 over the hidden channels (in blocks, another order than the
  matmul's) and rounded once. One program a chunk of tiles of the output pixels (about
  STATS_PROGRAMS in all), every input channel; tiles from QLHS_STENCIL_TILING's
  ``product_a_dot`` entry."""
  interpret = _interpret(interpret, "QLHS_PRODUCT_FORM")
  n, e = u.shape[-1], k9.shape[-1]
  check(n, "QLHS_PRODUCT_FORM", interpret=interpret, e=e)
  parts = _k_parts(u.dtype, k9.dtype)
  m0, bj0, warps, stages = tiling("product_a_dot")
  plan = dict(_chunked_plan(u.shape, stride, m0, bj0, every_block=True), e=e, dot=parts)
  _dot_tiles(plan, "QLHS_PRODUCT_FORM", interpret, _parts_channels(e, parts))
  plan, u2 = lean_plan(plan, u.reshape(-1, n), interpret)
  n_out = aw.shape[-1]
  y = pl.pallas_call(
      functools.partial(_product_a_kernel, plan=plan),
      out_shape=jax.ShapeDtypeStruct((plan["tiles"] * plan["m"], n_out), aw.dtype),
      grid=(plan["chunks"],), interpret=interpret, name=NAMES["product_a_dot"],
      **_params(warps, interpret, stages))(
          u2, cw, aw, k9.astype(F32).reshape(9, n * e), mul.astype(F32).reshape(n * e),
          add.astype(F32).reshape(n * e))
  return y[:plan["rows"]].reshape(plan["b"], plan["ho"], plan["wo"], n_out)


# ------------------------------------------------------------------------------------
# Row walks (QLHS_STENCIL_ROWS): the stride-1 kernels with each row of their stencil's
# input loaded three times, not nine.
#
# A tile of m flattened pixels loads each of its nine taps as m rows at a constant
# offset: nine loads of nearly the same rows through L1. On the H200 du ran with L1 at
# 94% of its peak and DRAM at 26% (benchmarks/NOTES.md, experiment 23), and the forward
# product and pass 4 ran at the same rate in XLA's form and in Pallas's (nine taps a
# pixel either way). Here a program walks down a strip of m columns of one image (or a
# chunk of its rows; narrow images go several to a strip, one row of each), a row at a
# time, and keeps in registers what it needs of the rows it has passed, so each row is
# loaded once per horizontal shift (-1, 0, +1):
# - du (a scatter, :func:`_du_rows_kernel`): row r of dx feeds du's rows r-1, r and
#   r+1; the program keeps two partial rows of du, summed over e ((m, bj) float32), and
#   stores each row when its last contribution arrives;
# - the forward product, pass 4 and pass 3's sums (a window, :func:`_rows_walk`):
#   output row y reads u's rows y-1, y and y+1; the program keeps the two rows above
#   (three shifts each, (m, bj) float32) and loads the row below;
# - the statistics' lags (:func:`_lags_rows_kernel`): row y pairs with rows y, y+1 and
#   y+2 at shifts -2..2; the program keeps the two rows below and loads the next;
# - pass 4 and du together (:func:`_dx_du_rows_kernel`): the product's window of u, and
#   du's scatter of each row of dx, formed in registers instead of loaded;
# - pass 3's sums, dc and du's share from g together (:func:`_bwd_rows_kernel`): the same
#   walk with z = g * mul for dx, and the sums' running tiles;
# - du's share from u (:func:`_du_bn_rows_kernel`): rows y-2..y+2 at shifts -2..2, a
#   5x5 stencil; the program keeps four rows and loads the next.
# The same sums as the tiles' kernels, in the same order per output: each kernel is
# tested against them and against float64 NumPy. Other strides keep the tiles.

ROWS_KERNELS = ("stats", "du", "sums", "product", "dx_du", "bwd")
# Whether a walk loads each step's rows one step ahead (its loads in flight during the
# step before), or where they are used. ptxas adds register moves for the carried rows:
# at stage 1 (batch 256, triton 3.9.0) the issue floors rise from 0.162 to 0.172 ms
# (du), 0.171 -> 0.185 (product), 0.232 -> 0.244 (pass 4) and 0.177 -> 0.191 (sums),
# against the tiles' 0.237, 0.181, 0.233 and 0.180; the tiles ran at 2-4x their floors
# on the H200. Not yet timed: benchmarks.stencil_times times du and the sums both ways
# ("pallas_rows_now" is this off).
ROWS_AHEAD = True
# Programs a row walk aims for (~8 per SM): an image's rows are split into chunks where
# the batch's strips and channel blocks give fewer (each chunk reloads two rows).
ROWS_PROGRAMS = 1056


def rows_kernels() -> tuple[str, ...]:
  """The kernels that walk rows at stride 1, QLHS_STENCIL_ROWS: a comma-separated
  subset of :data:`ROWS_KERNELS` ("stats": the lag sums of QLHS_STATS_FORM=pallas;
  "product": the forward product and pass 4; "dx_du": pass 4 and du as one walk,
  :func:`dx_du`, where du runs as Pallas; "bwd": :func:`bwd` then :func:`du_bn`, where
  the sums and du run as Pallas, in place of the sums' walk and dx_du), or "all"; unset,
  none (the tiles: what the H100 and H200 have timed)."""
  raw = settings.get("QLHS_STENCIL_ROWS")
  names = tuple(raw.replace(",", " ").split())
  if names == ("all",):
    return ROWS_KERNELS
  bad = [v for v in names if v not in ROWS_KERNELS]
  if bad or len(set(names)) != len(names):
    raise ValueError(f"{settings.name('QLHS_STENCIL_ROWS')}={raw!r}: want 'all' or a "
                     f"comma-separated subset of {ROWS_KERNELS} without repeats "
                     f"(unset: none, the tiles)")
  return names


def _walks_rows(kernel: str, stride: int) -> bool:
  return stride == 1 and kernel in rows_kernels()


def _rows_plan(b, h, w, n, e, m0, bj0, interpret) -> dict:
  """Strips of ``m`` lanes: ``m`` columns of an image (at most W, rounded up to a power
  of two), or, where W rounded up (``wp``) is narrower than the tiling's m0, ``per`` =
  m0 / wp images side by side, one row of each (stages 3-4: 14 and 7 px). ``bj``
  channels a program, ``chunks`` of ``span`` rows per image. Interpreted, a load is a
  ``dynamic_slice``, which moves a start outside the array and shifts every row, so
  the row-indexed arrays get ``guard`` rows in front and ``tail`` behind (a strip's
  shift reaches two pixels before the image (the statistics' lags; one elsewhere), the
  last strip up to m + 2 past it); on a GPU a masked row is not read or written, and
  none are added."""
  wp = pl.next_power_of_2(w)
  per = max(1, m0 // wp)
  m = min(m0, wp) * per
  bj = min(bj0, n) if n % min(bj0, n) == 0 else n
  strips = -(-w // m)
  groups = -(-b // per)
  chunks = min(h, max(1, -(-ROWS_PROGRAMS // (groups * strips * (n // bj)))))
  span = -(-h // chunks)
  return dict(b=b, h=h, w=w, n=n, e=e, m=m, bj=bj, wp=wp, per=per, groups=groups,
              strips=strips, span=span, chunks=-(-h // span), rows=b * h * w,
              order=grid_order(), ahead=ROWS_AHEAD, interpret=interpret,
              guard=2 if interpret else 0, tail=m + 2 if interpret else 0)


def _rows_pad(x2: jax.Array, plan: dict) -> jax.Array:
  """A (pixels, channels) array with the plan's guard and tail rows (interpreted)."""
  if plan["guard"] or plan["tail"]:
    x2 = jnp.pad(x2, ((plan["guard"], plan["tail"]), (0, 0)))
  return x2


def _rows_out(plan: dict, channels: int, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((plan["guard"] + plan["rows"] + plan["tail"], channels),
                              dtype)


def _rows_unpad(x2: jax.Array, plan: dict) -> jax.Array:
  return x2[plan["guard"]:plan["guard"] + plan["rows"]]


def _rows_programs(plan: dict) -> int:
  return plan["groups"] * plan["chunks"] * plan["strips"]


def _rows_call(kernel, plan, name, warps, interpret, out_shape, *args):
  """Launches a walk: ``kernel(*refs, plan=plan)``, one program per strip and chunk of
  rows (:func:`_rows_programs`) and channel block, named ``NAMES[name]``."""
  return pl.pallas_call(
      functools.partial(kernel, plan=plan), out_shape=out_shape,
      grid=_grid(plan, _rows_programs(plan), plan["n"] // plan["bj"]),
      interpret=interpret, name=NAMES[name], **_params(warps, interpret))(*args)


class _Strip:
  """This program's strip: lanes of image ``img`` at columns ``x`` (x0..x0+m-1), or of
  ``per`` images side by side (``img`` and ``x`` per lane), rows r0..r0+span-1 (its
  chunk) and channel block ``j0``. The strips of one chunk of rows have consecutive
  program ids, so programs started together read whole rows. One image a strip loads
  m contiguous rows at a computed start; several load by a row index per lane."""

  def __init__(self, plan):
    self.plan = plan
    pid, cb = _ids(plan)
    strips, chunks, m, per = plan["strips"], plan["chunks"], plan["m"], plan["per"]
    group = lax.div(pid, strips * chunks)
    self.r0 = lax.rem(lax.div(pid, strips), chunks) * plan["span"]
    lane = lax.broadcasted_iota(jnp.int32, (m,), 0)
    if per == 1:
      self.img, self.x0 = group, lax.rem(pid, strips) * m
      self.x = self.x0 + lane
      self.live = self.x < plan["w"]
    else:
      self.img = group * per + lax.div(lane, plan["wp"])
      self.x = lax.rem(lane, plan["wp"])
      self.live = (self.x < plan["w"]) & (self.img < plan["b"])
    self.j0 = cb * plan["bj"]
    # Each shift's lane mask and, with several images a strip, each lane's row offset,
    # formed once here, where the kernel starts: a load then adds only its row's scalar
    # terms. Formed at every load, they added vector operations to each load in the
    # Triton IR: the machine code was the same at stages 1-2 (at 3-4, 1-3 instructions
    # more in some loops), and du_bn's compile for the H100 took ~3% longer (NOTES.md,
    # experiment 31). (Here, not on first use: a value made inside a loop's body cannot
    # leave it.)
    w, hw = plan["w"], plan["h"] * plan["w"]
    self._lanes_ok = {s: self.live & (self.x + s >= 0) & (self.x + s < w)
                      for s in range(-2, 3)}
    self._lane_at = ({s: self.img * hw + self.x + s + plan["guard"] for s in range(-2, 3)}
                     if per > 1 else None)

  def _at(self, r, s, extra=True):
    """(first row, or each lane's row; mask) of pixels (r, x + s): masked outside the
    image, on lanes past it, and where ``extra`` (a scalar) is off."""
    plan = self.plan
    ok = self._lanes_ok[s] & ((r >= 0) & (r < plan["h"]) & extra)
    if plan["per"] == 1:  # scalars
      return self.img * (plan["h"] * plan["w"]) + r * plan["w"] + s + plan["guard"] + \
          self.x0, ok
    # A masked lane's row is 0 (a guard row where interpreted): its index stays in the
    # array, so that the interpreter's gather and scatter neither clip it onto a live
    # row nor drop it.
    return jnp.where(ok, self._lane_at[s] + r * plan["w"], 0), ok

  def _ref(self, ref, at, cols):
    if self.plan["per"] == 1:
      return ref.at[pl.ds(at, self.plan["m"]), cols]
    ids = cols.start + lax.broadcasted_iota(jnp.int32, (cols.size,), 0)
    return ref.at[at[:, None], ids[None, :]]

  def load(self, ref, r, s, cols, extra=True):
    """``ref``'s channels ``cols`` (a ``pl.ds``) at pixels (r, x + s), (m, channels) in
    ref's dtype, 0 outside the image and where ``extra`` (a scalar) is off."""
    from qlhs_jax.kernels.d_bn_product import plt
    at, ok = self._at(r, s, extra)
    return plt.load(self._ref(ref, at, cols), mask=ok[:, None], other=0.0)

  def store(self, ref, y, cols, value):
    """``value`` (m, channels) into ``ref``'s row y of the strip, if y is in this
    program's chunk and the image."""
    from qlhs_jax.kernels.d_bn_product import plt
    at, ok = self._at(y, 0, (y >= self.r0) & (y < self.r0 + self.plan["span"]))
    plt.store(self._ref(ref, at, cols), value.astype(ref.dtype), mask=ok[:, None])


def _du_scatter(st, du_ref, r, rows, k_tap, above, here, addends=()):
  """One step of du's scatter down a strip: dx's row r at shifts s = -1, 0, 1,
  ``rows`` ((m, bj*e) float32 each), gives du's row r + dy the sum h_dy(r) = sum_dx k_t
  dx(r, x - dx), summed over e; du(y) = h_+1(y-1) + h_0(y) + h_-1(y+1). Stores du's row
  r-1 = ``above`` + h_-1(r) (+ each of ``addends``' values, loaded after the sums; not
  stored outside the chunk) and returns the new (above, here): du's row r less
  h_-1(r+1), and row r+1's h_+1(r)."""
  plan = st.plan
  m, bj, e = plan["m"], plan["bj"], plan["e"]
  h = []
  for dy in (-1, 0, 1):
    acc = None
    for dx in (-1, 0, 1):
      term = rows[1 - dx] * k_tap(3 * (dy + 1) + dx + 1)
      acc = term if acc is None else acc + term
    h.append(acc.reshape(m, bj, e).sum(2))
  du = above + h[0]
  for addend in addends:
    du += addend()
  st.store(du_ref, r - 1, pl.ds(st.j0, bj), du)
  return here + h[1], h[2]


def _du_rows_kernel(dx_ref, k_ref, *rest, plan):
  """du = D^T dx at stride 1, walking down a strip. du(y, x) = sum over taps (dy, dx) of
  k_t dx(y - dy, x - dx), so dx's row r, loaded at shifts s = -dx, gives du's row r + dy
  the sum h_dy(r) = sum_dx k_t dx(r, x - dx); du(y) = h_+1(y-1) + h_0(y) + h_-1(y+1)."""
  *add_refs, du_ref = rest  # (the addends' refs, then du's)
  m, bj, e = plan["m"], plan["bj"], plan["e"]
  st = _Strip(plan)
  cols, out_cols = pl.ds(st.j0 * e, bj * e), pl.ds(st.j0, bj)

  last = st.r0 + plan["span"]  # the last row of dx that this chunk's du reads
  row = lambda r: tuple(st.load(dx_ref, r, s, cols, r <= last) for s in (-1, 0, 1))

  def body(i, carry):
    # above: du row r-1 less h_-1(r); here: du row r's h_+1(r-1); rows: dx's row r at
    # shifts -1, 0, 1, loaded one step ahead (plan["ahead"]: the next row's loads are
    # issued before this row's arithmetic, so that they are in flight while it runs)
    above, here, rows = carry
    r = st.r0 - 1 + i
    if plan["ahead"]:
      ahead = row(r + 1)
    else:
      rows, ahead = row(r), ()
    addends = [lambda a=a: st.load(a, r - 1, 0, out_cols).astype(F32) for a in add_refs]
    return _du_scatter(st, du_ref, r, [v.astype(F32) for v in rows],
                       _k_taps(k_ref, cols), above, here, addends) + (ahead,)
  zero = jnp.zeros((m, bj), F32)
  lax.fori_loop(0, plan["span"] + 2, body,
                (zero, zero, row(st.r0 - 1) if plan["ahead"] else ()))


def _rows_walk(st, u_ref, hidden_refs, body, carry):
  """Walks output rows y = r0..r0+span-1 with u's nine taps at each: ``body(y, taps,
  hidden, carry)`` returns the new carry; taps[t] is u at pixels (y + dy, x + dx), t =
  3*(dy+1) + dx + 1, (m, bj) float32, and ``hidden`` the rows y of ``hidden_refs`` (c,
  dp: (m, bj*e) float32, 0 outside the image). Each of u's rows is loaded at its three
  shifts once; the two rows above the current one are carried. With plan["ahead"]
  (:data:`ROWS_AHEAD`) everything a step uses is loaded one step ahead: the next
  step's loads are issued before this step's arithmetic, so that they are in flight
  while it runs."""
  plan = st.plan
  ucols, hcols = pl.ds(st.j0, plan["bj"]), pl.ds(st.j0 * plan["e"], plan["bj"] * plan["e"])
  last = st.r0 + plan["span"] - 1  # this chunk's last output row
  row = lambda r: tuple(st.load(u_ref, r, s, ucols, r <= last + 1) for s in (-1, 0, 1))
  rows_of = lambda y: tuple(st.load(ref, y, 0, hcols, y <= last) for ref in hidden_refs)
  f32 = lambda vs: [v.astype(F32) for v in vs]

  def step(i, c):
    above, here, below, hidden, inner = c
    y = st.r0 + i
    if plan["ahead"]:
      ahead = row(y + 2), rows_of(y + 1)
    else:  # loaded where used (the row below, and the hidden rows)
      below, hidden, ahead = row(y + 1), rows_of(y), ((), ())
    inner = body(y, f32(above + here + below), f32(hidden), inner)
    return (here, below) + ahead + (inner,)
  first = (row(st.r0 + 1), rows_of(st.r0)) if plan["ahead"] else ((), ())
  init = (row(st.r0 - 1), row(st.r0)) + first + (carry,)
  return lax.fori_loop(0, plan["span"], step, init)[4]


def _product_rows_kernel(u_ref, c_ref, k_ref, mul_ref, add_ref, p_ref, *, plan):
  m, bj, e = plan["m"], plan["bj"], plan["e"]
  st = _Strip(plan)
  cols = pl.ds(st.j0 * e, bj * e)

  def body(y, taps, hidden, carry):
    x = _d_of_taps(taps.__getitem__, _k_taps(k_ref, cols), m, bj, e)
    f1 = x * mul_ref[cols][None, :] + add_ref[cols][None, :]
    st.store(p_ref, y, cols, f1 * hidden[0])
    return carry
  _rows_walk(st, u_ref, (c_ref,), body, jnp.int32(0))


def _dx_dc_rows_kernel(u_ref, c_ref, dp_ref, k_ref, mul_ref, add_ref, cx_ref, c0_ref,
                       mean_ref, dx_ref, dc_ref, *, plan):
  m, bj, e = plan["m"], plan["bj"], plan["e"]
  st = _Strip(plan)
  cols = pl.ds(st.j0 * e, bj * e)
  vec = lambda ref: ref[cols][None, :]

  def body(y, taps, hidden, carry):
    x = _d_of_taps(taps.__getitem__, _k_taps(k_ref, cols), m, bj, e)
    c, dp = hidden
    mul, g = vec(mul_ref), dp * c
    st.store(dx_ref, y, cols, g * mul + (x - vec(mean_ref)) * vec(cx_ref) + vec(c0_ref))
    st.store(dc_ref, y, cols, dp * (x * mul + vec(add_ref)))
    return carry
  _rows_walk(st, u_ref, (c_ref, dp_ref), body, jnp.int32(0))


def _bn_sums_rows_kernel(u_ref, c_ref, dp_ref, out_ref, *, plan):
  """Pass 3's sums (g and the nine tap_t * g, as :func:`_bn_sums_kernel` without xhat),
  walking down a strip: one running (m, bj*e) tile per sum, summed over the pixels at
  the end into this program's row of the output."""
  m, bj, e = plan["m"], plan["bj"], plan["e"]
  st = _Strip(plan)
  cols = pl.ds(st.j0 * e, bj * e)
  wide = lambda v: jnp.broadcast_to(v[:, :, None], (m, bj, e)).reshape(m, bj * e)

  def body(y, taps, hidden, acc):
    g = hidden[0] * hidden[1]  # 0 outside the image
    return (acc[0] + g, *(acc[1 + t] + wide(taps[t]) * g for t in range(9)))
  acc = _rows_walk(st, u_ref, (dp_ref, c_ref), body,
                   tuple(jnp.zeros((m, bj * e), F32) for _ in range(10)))
  pid = _ids(plan)[0]
  for k, a in enumerate(acc):
    out_ref[pid, k, cols] = a.sum(0)


# The row walk that replaces each element-wise tile kernel at stride 1.
_ROWS_TWIN = {_product_kernel: _product_rows_kernel, _dx_dc_kernel: _dx_dc_rows_kernel}


def _dt_walk(u_ref, c_ref, dp_ref, k_ref, mul_ref, add_ref, *refs, plan, sums):
  """A walk down whole rows that forms a hidden row z(r) in registers and feeds it to du
  = D^T z as :func:`_du_rows_kernel` does: h_dy(r) = sum_s k_(dy, -s) z(r, x + s), du(y)
  = h_+1(y-1) + h_0(y) + h_-1(y+1). Step r forms D u's row r from u's rows r-1..r+1
  (the product's window) and c's and dp's row r, and stores dc = dp * (D u * mul + add).
  z(r) is g * mul (g = dp * c) with ``sums`` (:func:`bwd`, which also keeps pass 3's
  running sums of g and the nine tap_t * g over this chunk's rows, as
  :func:`_bn_sums_rows_kernel` does, into this program's row of the sums output), else
  pass 4's dx = g * mul + (D u - mean) * cx + c0 (:func:`dx_du`).
  z(r) at x - 1 and x + 1 is another lane's: Triton cannot shift a register tile, so
  the row goes through this program's own two rows of the last output (in z's dtype, m
  + 2 lanes each, the row's parity picking one), read back at the three shifts after a
  barrier. They stay in L2: z is not written to a hidden tensor and read back. Two
  rows, so that one barrier a step suffices: a lane writes a row again only after the
  barrier that every lane reaches once done reading it. The strip is whole rows of its
  images, so x + s is in this program's lanes wherever it is in the image.

  refs after add: with ``sums``, dc, du, the sums, the rows of z; else cx, c0, mean in
  and dc, du, the rows of z out."""
  from qlhs_jax.kernels.d_bn_product import plt
  if sums:
    dc_ref, du_ref, sums_ref, dx_ref = refs
  else:
    cx_ref, c0_ref, mean_ref, dc_ref, du_ref, dx_ref = refs
  m, bj, e = plan["m"], plan["bj"], plan["e"]
  st = _Strip(plan)
  ucols, cols = pl.ds(st.j0, bj), pl.ds(st.j0 * e, bj * e)
  # The kernel's taps and the vectors, loaded once: (1, bj*e) each
  kt = [k_ref[t, cols][None, :] for t in range(9)]
  vec = lambda ref: ref[cols][None, :]
  mul, add = vec(mul_ref), vec(add_ref)
  if not sums:
    cx, c0, mean = vec(cx_ref), vec(c0_ref), vec(mean_ref)
  pid, cb = _ids(plan)
  own = (pid * (plan["n"] // bj) + cb) * 2 * (m + 2) + 1  # lane 0 of this program's rows
  last = st.r0 + plan["span"]  # the last row of z that this chunk's du reads
  u_row = lambda r: tuple(st.load(u_ref, r, s, ucols, r <= last + 1) for s in (-1, 0, 1))
  hidden_row = lambda r: tuple(st.load(ref, r, 0, cols, r <= last)
                               for ref in (c_ref, dp_ref))
  wide = lambda v: jnp.broadcast_to(v[:, :, None], (m, bj, e)).reshape(m, bj * e)

  def step(i, carry):
    # above: du row r-1 less h_-1(r); here: du row r's h_+1(r-1); u's rows r-1, r (and
    # r+1, with c's and dp's row r, when loaded a step ahead) at shifts -1, 0, 1; acc:
    # the running sums
    above, here, u_above, u_here, u_below, hidden, acc = carry
    r = st.r0 - 1 + i
    if plan["ahead"]:
      ahead = u_row(r + 2), hidden_row(r + 1)
    else:  # loaded where used
      u_below, hidden, ahead = u_row(r + 1), hidden_row(r), ((), ())
    taps = [v.astype(F32) for v in u_above + u_here + u_below]
    x = _d_of_taps(taps.__getitem__, kt.__getitem__, m, bj, e)
    c, dp = (v.astype(F32) for v in hidden)
    st.store(dc_ref, r, cols, dp * (x * mul + add))
    g = dp * c  # 0 outside the image
    z = g * mul
    if sums:  # this chunk's rows only: the steps before and after are its neighbours'
      g = jnp.where((i >= 1) & (i <= plan["span"]), g, 0.0)
      acc = (acc[0] + g, *(acc[1 + t] + wide(taps[t]) * g for t in range(9)))
    else:  # pass 4's dx, summed in its order: (g * mul + (x - mean) * cx) + c0
      z = z + (x - mean) * cx + c0
    row = own + lax.rem(i, 2) * (m + 2)
    # rounded to z's dtype, as pass 4 stores dx (lanes outside the image: never read)
    dx_ref[pl.ds(row, m), pl.ds(0, bj * e)] = z.astype(dx_ref.dtype)
    if not plan["interpret"]:  # interpreted, a program runs alone, in order
      plt.debug_barrier()
    # z(r, x + s), 0 outside the image (and where r is)
    shifted = [plt.load(dx_ref.at[pl.ds(row + s, m), pl.ds(0, bj * e)],
                        mask=st._at(r, s)[1][:, None], other=0.0).astype(F32)
               for s in (-1, 0, 1)]
    return (_du_scatter(st, du_ref, r, shifted, kt.__getitem__, above, here)
            + (u_here, u_below) + ahead + (acc,))
  zero = jnp.zeros((m, bj), F32)
  first = (u_row(st.r0), hidden_row(st.r0 - 1)) if plan["ahead"] else ((), ())
  acc = tuple(jnp.zeros((m, bj * e), F32) for _ in range(10)) if sums else ()
  acc = lax.fori_loop(0, plan["span"] + 2, step,
                      (zero, zero, u_row(st.r0 - 2), u_row(st.r0 - 1)) + first
                      + (acc,))[-1]
  for k, a in enumerate(acc):
    sums_ref[pid, k, cols] = a.sum(0)


def _dx_du_rows_kernel(*refs, plan):
  """Pass 4 and du = D^T dx in one walk down whole rows (:func:`dx_du`): z is pass 4's
  dx = dp*c*mul + (D u - mean)*cx + c0, dc stored on the way (:func:`_dt_walk`)."""
  _dt_walk(*refs, plan=plan, sums=False)


def _bwd_rows_kernel(*refs, plan):
  """Pass 3's sums, dc and du's share from g in one walk (:func:`bwd`): z = g * mul."""
  _dt_walk(*refs, plan=plan, sums=True)


def dx_du(u, c5, dp5, k9, mul, add, cx, c0, mean, out_dtype, dx_dtype=None,
          interpret: bool | None = None):
  """Pass 4 of the "xla" path and du = D^T dx as one row walk at stride 1
  (QLHS_STENCIL_ROWS names "dx_du"): dc = dp * (D u * mul + add) in c's dtype, (B, H,
  W, n, e), and du (B, H, W, n) in ``out_dtype``, with dx = dp*c*mul + (D u - mean)*cx
  + c0 formed in float32, rounded to ``dx_dtype`` (default dp's, as pass 4 stores it)
  and not written to a hidden tensor (:func:`dx_dc` then :func:`d_transpose` store it
  and read it back: two hidden tensors a block). One BatchNorm group: the vectors are
  (1, n, e). A strip is whole rows: the tiling's pixels are raised to W rounded up to a
  power of two where they are fewer, and its channels lowered as much."""
  interpret = _walk_operands("dx_du", "QLHS_DU_FORM", u, k9, c5, dp5,
                             dict(mul=mul, add=add, cx=cx, c0=c0, mean=mean), interpret)
  b, h, w, n = u.shape
  e = k9.shape[-1]
  plan, warps = _whole_rows_plan("dx_du", b, h, w, n, e, interpret)
  args = _rows_args(plan, u, (c5, dp5), k9, (mul, add, cx, c0, mean))
  # dx's rows in its dtype: in bfloat16 half the L2 traffic of float32 (each row is
  # written, then read at three shifts, the second and third mostly from L1)
  dx_dtype = dp5.dtype if dx_dtype is None else dx_dtype
  dc, du, _ = _rows_call(_dx_du_rows_kernel, plan, "dx_du", warps, interpret,
                         (_rows_out(plan, n * e, c5.dtype), _rows_out(plan, n, out_dtype),
                          _z_rows(plan, n, dx_dtype)), *args)
  return (_rows_unpad(dc, plan).reshape(c5.shape),
          _rows_unpad(du, plan).reshape(b, h, w, n))


def _walk_operands(name, form, u, k9, c5, dp5, vectors, interpret):
  """Checks a whole-rows walk's operands (:func:`dx_du`, :func:`bwd`): c and dp u's pixels
  with n x e hidden channels (stride 1), the ``vectors`` {name: array} (1, n, e) each
  (one BatchNorm group); returns ``interpret`` resolved (:func:`_interpret`)."""
  interpret = _interpret(interpret, form)
  b, h, w, n = u.shape
  e = k9.shape[-1]
  check(n, form, interpret=interpret, e=e)
  if c5.shape != (b, h, w, n, e) or dp5.shape != c5.shape:
    raise ValueError(f"{name}: c {c5.shape} and dp {dp5.shape} are not u's {u.shape} "
                     f"pixels with {n} x {e} hidden channels (stride 1 only)")
  shapes = [v.shape for v in vectors.values()]
  if any(s_ != (1, n, e) for s_ in shapes):
    names = ", ".join(list(vectors)[:-1]) + " and " + list(vectors)[-1]
    raise ValueError(f"{name}: the vectors {names} are {shapes}, not (1, {n}, {e}) "
                     f"each: one BatchNorm group only")
  return interpret


def _whole_rows_plan(kernel, b, h, w, n, e, interpret):
  """A walk's plan whose strips are whole rows of their images (:func:`_dt_walk`): the
  tiling's pixels raised to W rounded up to a power of two where they are fewer, its
  channels lowered as much; and its warps."""
  m0, bj0, warps = tiling(kernel, rows=True)
  wide = max(m0, pl.next_power_of_2(w))
  plan = _rows_plan(b, h, w, n, e, wide, max(1, bj0 * m0 // wide), interpret)
  assert plan["strips"] == 1, plan
  return plan, warps


def _z_rows(plan, n, dtype) -> jax.ShapeDtypeStruct:
  """:func:`_dt_walk`'s rows of z: two of m + 2 lanes a program and channel block."""
  return jax.ShapeDtypeStruct(
      (_rows_programs(plan) * (n // plan["bj"]) * 2 * (plan["m"] + 2),
       plan["bj"] * plan["e"]), dtype)


def bwd(u, c5, dp5, k9, mul, add, mean, rstd, dx_dtype=None,
        interpret: bool | None = None):
  """The "xla" path's backward over its hidden tensors in one walk at stride 1
  (QLHS_STENCIL_ROWS names "bwd"): pass 3's sums, dc, and du's share from g.

  BatchNorm's backward, dx = g*mul + (D u - mean)*cx + c0 (g = dp * c), needs pass 3's
  sums only through cx and c0, the per-channel coefficients of its second part; and D^T
  of that part is a function of u alone. So du = D^T(g*mul) + D^T((D u - mean)*cx + c0)
  splits into a share that needs no sums, formed here in the same walk that takes
  them, and one that :func:`du_bn` adds from u afterwards. c and dp are read once for
  the whole backward (pass 3, then pass 4 and du, read them twice, and dx once more).

  Returns ``(dc, du_g, (sg, sgx, tg))``: dc = dp * (D u * mul + add) in c's dtype;
  du_g = D^T(g * mul) (B, H, W, n) float32, with g * mul rounded to ``dx_dtype``
  (default dp's) as pass 4 rounds dx; and :func:`bn_sums`' three sums. ``mean``,
  ``rstd``, ``mul``, ``add`` (1, n, e): one BatchNorm group. The rounding differs from
  pass 4's: this share of dx is rounded, du_bn's not, where pass 4 rounds their sum
  (benchmarks/NOTES.md, experiment 29)."""
  interpret = _walk_operands("bwd", "QLHS_SUMS_FORM", u, k9, c5, dp5,
                             dict(mul=mul, add=add, mean=mean, rstd=rstd), interpret)
  b, h, w, n = u.shape
  e = k9.shape[-1]
  plan, warps = _whole_rows_plan("bwd", b, h, w, n, e, interpret)
  dx_dtype = dp5.dtype if dx_dtype is None else dx_dtype
  dc, du_g, part, _ = _rows_call(
      _bwd_rows_kernel, plan, "bwd", warps, interpret,
      (_rows_out(plan, n * e, c5.dtype), _rows_out(plan, n, F32),
       jax.ShapeDtypeStruct((_rows_programs(plan), 10, n * e), F32),
       _z_rows(plan, n, dx_dtype)),
      *_rows_args(plan, u, (c5, dp5), k9, (mul, add)))
  sums = _sums_out(_total(part).reshape(10, n, e), k9, mean, rstd)
  return (_rows_unpad(dc, plan).reshape(c5.shape),
          _rows_unpad(du_g, plan).reshape(b, h, w, n), sums)


# du_bn's coefficient rows (:func:`_du_bn_coefficients`): D^T D's 25 lags, the border
# rows' and columns' 5 each, the corners' 4, then the constant's 9.
_K5, _TOP, _BOTTOM, _LEFT, _RIGHT, _CORNER, _CONST = 0, 25, 30, 35, 40, 45, 49
_COEF_ROWS = 58


def _du_bn_coefficients(k9, cx, c0, mean):
  """du_bn's (58, n) float32 coefficients. With z = cx * (D u - mean) + c0 = cx * D u + b
  (b = c0 - cx * mean) and D u(q) = sum_t k_t u(q + t), D^T z(p) = sum_t [p - t in the
  image] (sum_t' Q[t, t'] u(p - t + t') + beta_t), Q[t, t'] = sum_s cx_s k_(t,s) k_(t',s)
  and beta_t = sum_s k_(t,s) b_s. Inside the image's border every tap counts: a 5x5
  stencil of u, K[d] = sum over t' - t = d of Q[t, t'], plus sum_t beta_t. On a border
  row or column the taps t that leave the image are taken off again, and on a corner
  the one counted twice is put back (1 - my*mx = (1 - my) + (1 - mx) - (1 - my)(1 - mx)
  per tap); u being 0 outside the image, what they take off reads u on the pixel's own
  row (top, bottom: 5 shifts), own column (left, right: 5 rows) or the pixel itself
  (corners). Rows: K[5 (dy + 2) + dx + 2]; top and bottom by dx, left and right by dy;
  the corners' Q[t, t] (top-left, top-right, bottom-left, bottom-right); the constants:
  all taps, top, bottom, left, right, the four corners' beta. Sums of float32 products
  (no dot: no TF32 on a GPU)."""
  k = k9.astype(F32)
  cxs, b = cx.astype(F32)[0], (c0 - cx * mean).astype(F32)[0]  # (n, e)
  # The sums over e written out: element-wise, the whole table is one XLA fusion (as
  # reductions, three more small kernels a block)
  q = sum(cxs[None, None, :, s] * k[:, None, :, s] * k[None, :, :, s]
          for s in range(k.shape[-1]))  # (9, 9, n)
  beta = sum(k[..., s] * b[None, :, s] for s in range(k.shape[-1]))  # (9, n)
  tap = lambda dy, dx: 3 * (dy + 1) + dx + 1
  pairs = [(ty, tx, sy, sx) for ty in (-1, 0, 1) for tx in (-1, 0, 1)
           for sy in (-1, 0, 1) for sx in (-1, 0, 1)]
  k5 = [sum(q[tap(ty, tx), tap(sy, sx)] for ty, tx, sy, sx in pairs
            if (sy - ty, sx - tx) == (dy, dx))
        for dy in range(-2, 3) for dx in range(-2, 3)]
  def line(fixed, row):  # the taps on one border row (row) or column, by offset
    at = (lambda a: tap(fixed, a)) if row else (lambda a: tap(a, fixed))
    return [sum(q[at(a), at(c)] for a in (-1, 0, 1) for c in (-1, 0, 1) if c - a == d)
            for d in range(-2, 3)]
  corners = [(1, 1), (1, -1), (-1, 1), (-1, -1)]  # top-left, top-right, bottom-left, -right
  rows = (k5 + line(1, True) + line(-1, True) + line(1, False) + line(-1, False)
          + [q[tap(*c), tap(*c)] for c in corners]
          + [beta.sum(0)]
          + [sum(beta[tap(fy, a)] for a in (-1, 0, 1)) for fy in (1, -1)]
          + [sum(beta[tap(a, fx)] for a in (-1, 0, 1)) for fx in (1, -1)]
          + [beta[tap(*c)] for c in corners])
  assert len(rows) == _COEF_ROWS, len(rows)
  return jnp.stack(rows)


def du_bn_unrolled(plan: dict) -> int:
  """The trips of five steps that :func:`_du_bn_rows_kernel` makes down its chunk, 0 if
  it walks one step a trip. Five, the window's period: inside a trip its rows are
  renamed, not moved between registers (ptxas, triton 3.9, at stage 1: 132
  instructions a row, against 291 a row, the border branch included, one step a trip).
  The trips hold no border row and no branch. Step 0 and the steps from the trips' end
  to the bottom row's (:func:`du_bn_bottom_step`) are written out, the border rows'
  terms weighted by 0/1 flags on step 0 and the bottom row's step; the steps after it
  (inner rows in the chunks above the last) loop without them. With the branch on every
  step of a trip, bwd's walk and du_bn took 18-22 s to compile at stage 1 for the H100
  (``benchmarks.stencil_times --compile-only``, 2 CPU cores), 13-15 s now (NOTES.md,
  experiment 30). Triton 3.9's TTGIR passes did not finish in 200 s on the
  unrolled loop at stage 4 (four 7-px images a strip, every load a gather), so strips
  of several images walk one step a trip."""
  return max(0, (du_bn_bottom_step(plan) - 1) // 5) if plan["per"] == 1 else 0


def du_bn_bottom_step(plan: dict) -> int:
  """The step at which a chunk walks the image's bottom row, in the chunk that holds it
  (an inner row in the chunks above it, the same step)."""
  return (plan["h"] - 1) % plan["span"]


def _du_bn_rows_kernel(u_ref, coef_ref, add_ref, du_ref, *, plan):
  """:func:`du_bn` walking down a strip: output row y from u's rows y-2..y+2 at shifts
  -2..2 (four carried, one loaded a step), 25 multiply-adds a value for the 5x5
  stencil, the border columns' corrections weighted by the lanes' 0/1 flags, and on
  the image's first and last row the border rows' and the corners'
  (:func:`_du_bn_coefficients`): in a branch taken on those rows alone, or, where the
  walk runs five rows a trip (:func:`du_bn_unrolled`), on the steps that can hold them,
  written out of the loop."""
  m, bj = plan["m"], plan["bj"]
  st = _Strip(plan)
  cols = pl.ds(st.j0, bj)
  co = lambda i: coef_ref[i, cols][None, :]  # (1, bj)
  # loaded once: the 5x5 stencil, the border columns' and the constants that every row
  # takes
  k5 = [co(_K5 + i) for i in range(25)]
  col = [co(_LEFT + i) for i in range(5)], [co(_RIGHT + i) for i in range(5)]
  const, const_l, const_r = co(_CONST), co(_CONST + 3), co(_CONST + 4)
  last = st.r0 + plan["span"] - 1  # this chunk's last output row
  # each row in float32 once, where loaded: the window is carried converted, not its
  # 25 taps converted at every step
  row = lambda r: tuple(st.load(u_ref, r, s, cols, r <= last + 2).astype(F32)
                        for s in range(-2, 3))
  left = (st.x == 0).astype(F32)[:, None]
  right = (st.x == plan["w"] - 1).astype(F32)[:, None]

  def border_row(y, own):
    """The first or last row's terms (own: the row's taps at shifts -2..2; the corners'
    read the pixel itself, own[2])."""
    top = (y == 0).astype(F32)
    bottom = (y == plan["h"] - 1).astype(F32)
    out = None
    for dx in range(5):
      term = own[dx] * (top * co(_TOP + dx) + bottom * co(_BOTTOM + dx))
      out = term if out is None else out + term
    out = -(out + top * co(_CONST + 1) + bottom * co(_CONST + 2))
    corner_l = (top * co(_CORNER) + bottom * co(_CORNER + 2)) * own[2]
    corner_r = (top * co(_CORNER + 1) + bottom * co(_CORNER + 3)) * own[2]
    out += left * (corner_l + top * co(_CONST + 5) + bottom * co(_CONST + 7))
    return out + right * (corner_r + top * co(_CONST + 6) + bottom * co(_CONST + 8))

  def step(i, c, border=None):
    """Output row r0 + i. border: None, a branch to the border rows' terms on the
    image's first and last row; True, the terms weighted by the row's flags (zero on
    an inner row); False, none (the row is an inner one)."""
    win, ahead = c[:4], c[4]
    y = st.r0 + i
    if plan["ahead"]:
      below2, nxt = ahead, row(y + 3)
    else:
      below2, nxt = row(y + 2), ()
    rows = win + (below2,)  # rows y-2..y+2
    acc = None
    for t in range(25):
      term = rows[t // 5][t % 5] * k5[t]
      acc = term if acc is None else acc + term
    at_x = [rows[dy][2] for dy in range(5)]  # the pixel's own column
    acc += const - left * (sum(v * k for v, k in zip(at_x, col[0])) + const_l)
    acc -= right * (sum(v * k for v, k in zip(at_x, col[1])) + const_r)
    if border is None:
      acc += lax.cond((y == 0) | (y == plan["h"] - 1),
                      lambda: border_row(y, rows[2]),
                      lambda: jnp.zeros((m, bj), F32))
    elif border:
      acc += border_row(y, rows[2])
    acc += st.load(add_ref, y, 0, cols).astype(F32)
    st.store(du_ref, y, cols, acc)
    return win[1:] + (below2, nxt)
  first = row(st.r0 + 2) if plan["ahead"] else ()
  init = tuple(row(st.r0 + d) for d in (-2, -1, 0, 1)) + (first,)
  trips = du_bn_unrolled(plan)
  if not trips:
    lax.fori_loop(0, plan["span"], step, init)
    return

  def five(g, c):
    for k in range(5):
      c = step(1 + 5 * g + k, c, border=False)
    return c
  bottom = du_bn_bottom_step(plan)
  c = lax.fori_loop(0, trips, five, step(0, init, border=True))
  for i in range(1 + 5 * trips, bottom + 1):  # at most five steps, written out
    c = step(i, c, border=i == bottom)
  if bottom + 1 < plan["span"]:  # (a loop without trips is compiled all the same)
    lax.fori_loop(bottom + 1, plan["span"], functools.partial(step, border=False), c)


def du_bn(u, k9, cx, c0, mean, du_g, out_dtype, interpret: bool | None = None):
  """du = du_g + D^T((D u - mean) * cx + c0) in ``out_dtype``, (B, H, W, n): the share of
  du that BatchNorm's mean and variance terms give, from u alone (:func:`bwd` gives
  ``du_g``), at stride 1. D^T of a per-channel affine function of D u is a 5x5 stencil
  of u on n channels with corrections on the image's border
  (:func:`_du_bn_coefficients`): 25 multiply-adds a value where D u's nine taps and
  D^T's nine on n*e hidden channels take ~80, no hidden row formed or rounded. A walk
  down strips (QLHS_STENCIL_TILING's ``du_bn``). One BatchNorm group: ``cx``, ``c0``,
  ``mean`` (1, n, e)."""
  interpret = _interpret(interpret, "QLHS_DU_FORM")
  b, h, w, n = u.shape
  e = k9.shape[-1]
  check(n, "QLHS_DU_FORM", interpret=interpret, e=e)
  shapes = [v.shape for v in (cx, c0, mean)]
  if any(s_ != (1, n, e) for s_ in shapes) or du_g.shape != u.shape:
    raise ValueError(f"du_bn: the vectors cx, c0 and mean are {shapes}, not (1, {n}, "
                     f"{e}) each (one BatchNorm group only), or du_g {du_g.shape} is not "
                     f"u's {u.shape}")
  m0, bj0, warps = tiling("du_bn", rows=True)
  plan = _rows_plan(b, h, w, n, 1, m0, bj0, interpret)
  du = _rows_call(_du_bn_rows_kernel, plan, "du_bn", warps, interpret,
                  _rows_out(plan, n, out_dtype), _rows_pad(u.reshape(-1, n), plan),
                  _du_bn_coefficients(k9, cx, c0, mean),
                  _rows_pad(du_g.reshape(-1, n), plan))
  return _rows_unpad(du, plan).reshape(b, h, w, n)


def _lags_rows_kernel(u_ref, out_ref, *, plan):
  """:func:`lag_sums` walking down a strip: the 14 sums of u and its lag products, then
  the 32 border terms, into this program's row of ``out_ref``. Lag (dy, dx) pairs u at
  row y with rows y + dy, dy = 0, 1, 2, at dx = -2..2: each row is loaded at its five
  shifts once, and the two rows below the current one are carried (three, loaded a
  step ahead, with plan["ahead"]). The columns' terms (sum, lag-0, 1, 2 products down
  column 0 and column W-1) are the lanes x = 0 and x = W-1 of the sum of u and of the
  lag (0, 0), (1, 0) and (2, 0) products: four running tiles, masked to those lanes,
  shared by the two columns (each lane is one column), split at the end. The rows'
  terms and the corners come from rows 0 and H-1, loaded again by the programs whose
  chunk holds them."""
  m, bj, h, w = plan["m"], plan["bj"], plan["h"], plan["w"]
  st = _Strip(plan)
  cols = pl.ds(st.j0, bj)
  last = st.r0 + plan["span"] - 1  # this chunk's last row
  row = lambda r: tuple(st.load(u_ref, r, s, cols, r <= last + 2) for s in range(-2, 3))
  ahead = plan["ahead"]
  side = ((st.x == 0) | (st.x == w - 1))[:, None]
  on_side = [LAGS.index(d) for d in ((0, 0), (1, 0), (2, 0))]

  def step(i, c):
    here, below, below2, acc = c
    if ahead:
      nxt = row(st.r0 + i + 3)
    else:  # loaded where used
      below2, nxt = row(st.r0 + i + 2), ()
    f = lambda r: [v.astype(F32) for v in r]
    here_, below_, below2_ = f(here), f(below), f(below2)
    u0 = here_[2]
    lagged = here_[2:] + below_ + below2_  # LAGS' order: (0, 0..2), (1, -2..2), (2, -2..2)
    prods = [u0 * v for v in lagged]
    acc = ((acc[0] + u0,) + tuple(a + p for a, p in zip(acc[1:14], prods))
           + tuple(a + jnp.where(side, v, 0.0)
                   for a, v in zip(acc[14:], [u0] + [prods[k] for k in on_side])))
    return below, below2, nxt, acc
  init = (row(st.r0), row(st.r0 + 1), row(st.r0 + 2) if ahead else (),
          tuple(jnp.zeros((m, bj), F32) for _ in range(18)))
  acc = lax.fori_loop(0, plan["span"], step, init)[3]
  pid = _ids(plan)[0]
  for k in range(14):
    out_ref[pid, k, cols] = acc[k].sum(0)
  lane = lambda x0, v: jnp.where((st.x == x0)[:, None], v, 0.0).sum(0)

  def row_terms(y, mine):
    """Row y's sum and lag-0, 1, 2 products; its first and last pixel's value and
    square (summed over the strip's images, each squared on its own lane)."""
    v0, v1, v2 = (st.load(u_ref, y, s, cols, mine).astype(F32) for s in (0, 1, 2))
    sq = v0 * v0
    ends = [(lane(x0, v0), lane(x0, sq)) for x0 in (0, w - 1)]
    return [v0.sum(0), sq.sum(0), (v0 * v1).sum(0), (v0 * v2).sum(0)], ends
  top, (top_first, top_last) = row_terms(0, st.r0 == 0)
  # (no chunk starts past the image: the last chunk holds row H-1)
  bottom, (bottom_first, bottom_last) = row_terms(h - 1, h - 1 <= last)
  corners = {"top": (top_first, top_last), "bottom": (bottom_first, bottom_last),
             "left": (top_first, bottom_first), "right": (top_last, bottom_last)}
  terms = {"top": top, "bottom": bottom,
           "left": [lane(0, a) for a in acc[14:]], "right": [lane(w - 1, a) for a in acc[14:]]}
  for k, name in enumerate(BORDER_SIDES):
    first, end = corners[name]
    # The corners are counted by the programs whose chunk holds their row only.
    for r, v in enumerate(terms[name] + [*first, *end]):
      out_ref[pid, 14 + 8 * k + r, cols] = v
