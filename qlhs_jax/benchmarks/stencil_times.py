"""The stencil's statistics, pass 3's sums, du = D^T dx, pass 4 with du and the forward
product, XLA's forms against the Pallas kernels of ``kernels.stencil``, each timed alone
on the GPU.

  python -m qlhs_jax.benchmarks.stencil_times [--batch 256] [--budget 90] [--record FILE]
      [--kernels stats,sums,du,dx_du,bwd,product] [--forms pallas,pallas_rows]

For each block shape of Eq.(3) at 224 px (``benchmarks.block_tune.block_shapes``: each
width's largest shape first), on random bfloat16 inputs at ``--batch``:

- ``stats``: the 9 tap sums and 45 Gram entries of u, as ``d_bn_product._xla_stats``
  reduces them ("xla", the default form) and as ``stencil.tap_stats`` at each of
  ``--stats-tilings`` (pixels, channels, warps, splits), from lag products at stride 1
  ("pallas") and from all 54 products ("pallas_gram", experiment 13's kernel), and the
  lags as matrix products at each ``--stats-dot-tilings`` (pixels, channels, warps,
  stages; "pallas_dot", Triton's pipelined loads; at stride 2 "pallas"'s kernel);
- ``sums``: pass 3's sums of ``fuse_d_bn="xla"`` (g, g * xhat and the nine tap products
  of g), as ``d_bn_product._xla_backward_sums`` reduces them ("xla") and as
  ``stencil.bn_sums`` at each ``--sums-tilings`` (pixels, channels, warps), from the
  taps' products ("pallas") and from D u and xhat as before 2026-12-04 ("pallas_xhat"),
  and as matrix products at each ``--sums-dot-tilings`` ("pallas_dot");
- ``du``: D^T dx in u's dtype, as the "gather" (default) and "autodiff" forms of
  ``d_bn_product._d_transpose`` and as ``stencil.d_transpose`` at each ``--du-tilings``
  (pixels, channels, warps).
- ``dx_du``: pass 4 (dx and dc) then du, at stride 1, as the "xla" path runs them
  without a GPU ("xla": XLA's loop fusion then the "gather" form of du, the reference),
  as the default step runs them on one ("pallas": XLA's pass 4, then
  ``stencil.d_transpose`` at its default tiles), and as one walk, ``stencil.dx_du``
  ("pallas_rows" and "pallas_rows_now", at each ``--dx-du-tilings``), dx never stored.
- ``bwd``: the whole backward over the hidden tensors at stride 1: pass 3's sums, dc
  and du (outputs dc, du and the three sums), as XLA's forms ("xla", the reference), as
  the default step runs them on a GPU ("pallas": ``stencil.bn_sums``' tiles, XLA's pass
  4, ``stencil.d_transpose``'s tiles) and as ``stencil.bwd`` then ``stencil.du_bn``
  ("pallas_rows", "pallas_rows_now", at each ``--bwd-tilings``, ``bwd``'s; du_bn at
  its default): c and dp read once. The walk and du_bn run as two programs back to
  back, du_bn's compiled once a shape and form (:class:`TwoPrograms`).
- ``product``: the forward product p = (D u * mul + add) * c, as XLA's loop fusion
  ("xla", the default) and as ``stencil.product`` at each ``--product-tilings``
  ("pallas"; QLHS_PRODUCT_FORM=pallas, which takes pass 4 to Pallas too), and with D u
  as matrix products at each ``--product-dot-tilings`` (pixels, channels, warps,
  stages; "pallas_dot", Triton's pipelined loads).
- ``--d-kernel compute``: every entry gets D's kernel in bfloat16, as
  QLHS_D_KERNEL=compute gives it (the product's products then take one part of it, at
  :data:`PRODUCT_DOT_ONE_PART_TILINGS` unless named); the forms line names the setting.
- "pallas_rows" (stats, sums, du and product): the same kernels walking rows at stride 1
  (QLHS_STENCIL_ROWS; pixels is the strip's width), at the same tilings; at stride 2
  they are the tiles, timed under both names so that each form covers every shape.
  "pallas_rows_now": the walks with each row loaded where it is used, not a step ahead
  (``stencil.ROWS_AHEAD``, a constant, not a setting: where it wins, the forms line
  names the walk, and the constant is for the next commit to change).

Each time is the median of ``--repeats`` runs of ``--calls`` back-to-back calls, printed
as soon as it is taken. Each Pallas result is checked against the XLA form (relative
max difference; above :data:`WRONG` it is marked WRONG and not chosen). After each
shape it prints two lines, each complete on its own, so that a run its time limit stops
still leaves usable values:
- ``stencil_tiling: SPEC``: the QLHS_STENCIL_TILING of the fastest tilings over the
  shapes timed so far (times weighted by each shape's blocks);
- ``stencil_forms: VARS``: QLHS_STATS_FORM, QLHS_SUMS_FORM, QLHS_DU_FORM and
  QLHS_PRODUCT_FORM, each the fastest form over those shapes, named (an XLA form too:
  unset, each is "auto", and the product "xla"), and QLHS_STENCIL_ROWS where a walk is
  fastest (dx_du: where the one walk beats pass 4 then du; bwd: where its two walks
  beat the default's three kernels and the sums and pass 4 with du as chosen).

``benchmarks/gpu_h100.sh step`` passes both to its rows. On a CPU the kernels run
interpreted: a smoke test, no timing worth reading.

``--compile-only h100`` (with JAX's CUDA plugin, no GPU needed) compiles every entry for the
GPU by the XLA and Triton that run there, and prints the seconds each took and its
Pallas kernels: what a sweep spends before it times, and whether every entry compiles.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
import time
from typing import Callable, NamedTuple

KERNELS = ("stats", "sums", "du", "dx_du", "bwd", "product")
STATS_TILINGS = ("32,16,4,3", "16,16,4,1", "32,16,4,2", "64,16,8,3")
SUMS_TILINGS = ("16,8,4", "32,8,8", "16,16,4", "32,8,4")
# du's: 16,8,4 (one input channel a thread) waits for its loads 4 times, the others 8-9,
# for more instructions (NOTES.md, experiment 39).
DU_TILINGS = ("32,16,4", "16,32,4", "64,16,8", "16,8,4")
# dx_du's strip is whole rows (the pixels are raised to W rounded up, the channels
# lowered as much): at stage 1 these are 64 lanes by 4, 2, 4 and 2 channels, 8, 4, 4 and
# 8 values a thread; ptxas (triton 3.9.0): 191, 95, 104 and 191 registers, issue
# floors 0.378, 0.476, 0.456 and 0.378 ms (NOTES.md, experiment 25). Which matters
# more, warps resident (8, 20, 16 and 10 an SM) or instructions, is the GPU's question.
DX_DU_TILINGS = ("32,8,4", "32,4,4", "32,8,8", "32,4,2")
# bwd's (pass 3's sums, dc and du's share from g in one walk): at stage 1, 64 lanes by
# 2 and 4 channels, 147 and 255 registers, no spills (NOTES.md, experiment 29).
BWD_TILINGS = ("32,4,4", "32,8,4")
# The product's tiles (pass 4's too): the default (one element of a tap a thread: 4 waits
# for loads in the product's machine code, 7 in pass 4; experiment 39), 16,32,8 (two: no
# barrier, 8 and 6 waits, fewer instructions; experiment 38) and 32,16,4, the default
# before (each tap through shared memory behind a barrier); none timed alone on a GPU.
PRODUCT_TILINGS = ("16,16,8", "16,32,8", "32,16,4")
# The dot forms' (pixels, channels, warps, stages), the default first: at 32 pixels a
# thread copies 8 bytes of a tap, through L1, at 64 pixels 16 bytes, past L1 (the lower
# issue floor; NOTES.md, experiment 40) with twice the shared memory (the default until
# 2026-12-07; experiment 55).
SUMS_DOT_TILINGS = ("32,16,4,3", "64,16,4,3")
STATS_DOT_TILINGS = ("32,16,4,4", "32,16,4,3", "64,16,4,3")  # 4 stages: experiment 53
# du's (experiment 41): the default, its taps copied ahead past L1 (two programs an SM);
# the same with 1 stage, its taps loaded through L1, not ahead (7 programs an SM); and
# 16 channels a block (one program an SM).
DU_DOT_TILINGS = ("64,8,4,3", "64,8,4,1", "64,16,4,3")
# The product's (experiment 42): the default (4 programs an SM by shared memory), the
# same with 3 stages (2 trips of copies in flight, 3 programs) and 128 pixels (2).
PRODUCT_DOT_TILINGS = ("64,4,4,2", "64,4,4,3", "128,4,4,2")
# The product's with D's kernel in bfloat16 (--d-kernel compute), one part of it, 16
# channels a block at e = 4 (experiment 43): the default (stencil.ONE_PART_TILING, 2
# stages since 2026-12-07: 1 trip of copies in flight), the same with 3 stages (the
# default before; experiment 55), and 64 pixels (2 programs, the taps past L1).
PRODUCT_DOT_ONE_PART_TILINGS = ("32,16,4,2", "32,16,4,3", "64,16,4,2")
# Largest relative difference to the XLA form that passes: the statistics are float32
# sums (order differs); du is stored in bfloat16, where one rounding step is 2^-8.
# dx_du: dc and du in bfloat16 (the one walk sums dx in float32, the two kernels round
# it to bfloat16 between them).
# bwd: dc and du in bfloat16, the sums float32 (the largest of all its outputs).
WRONG = {"stats": 1e-3, "sums": 1e-3, "du": 1e-2, "dx_du": 1e-2, "bwd": 1e-2,
         "product": 1e-2}


def _inputs(batch, side, n, stride, e=4, seed=0, d_kernel="float32"):
  import jax
  import jax.numpy as jnp

  from qlhs_jax.models.layers import _out_size
  ho = _out_size(side, stride)
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  u = (jax.random.normal(k1, (batch, side, side, n)) + 0.3).astype(jnp.bfloat16)
  dx = jax.random.normal(k2, (batch, ho, ho, n, e)).astype(jnp.bfloat16)
  k9 = jax.random.normal(k3, (9, n, e), jnp.float32)
  if d_kernel == "compute":  # as d_bn_product gives it under QLHS_D_KERNEL=compute
    k9 = k9.astype(jnp.bfloat16)
  return u, dx, k9


def _functions(stride, side, interpret):
  """{(kernel, form): (fn(u, dx, k9), tilings-env or None)} for one shape."""
  import jax.numpy as jnp

  from qlhs_jax.kernels import d_bn_product as dbn
  from qlhs_jax.kernels import stencil
  hw = (side, side)

  def moments(k9):  # BatchNorm's mean and rstd as the model has them, (1, n, e)
    return jnp.full((1,) + k9.shape[1:], 0.1), jnp.full((1,) + k9.shape[1:], 2.0)

  def pass4_vectors(k9):  # mul, add, cx, c0, mean: (1, n, e)
    return [jnp.full((1,) + k9.shape[1:], v) for v in (2.0, 0.1, -0.3, 0.05, 0.1)]

  def pass4_then_du(u, dx, k9, form):  # dx as c and dp; returns (dc, du)
    mul, add, cx, c0, mean = pass4_vectors(k9)
    d, dc = dbn._xla_backward_dx(u, dx, dx, k9, mul, cx, c0, mean, stride, 1, u.dtype,
                                 add=add)
    if form == "pallas":
      return dc, stencil.d_transpose(d, k9, stride, hw, out_dtype=u.dtype,
                                     interpret=interpret)
    return dc, dbn._d_transpose(d, k9, stride, hw, "gather").astype(u.dtype)

  def bwd_coefficients(u, k9, sums):  # BatchNorm's cx and c0 from pass 3's sums
    mul, rstd = pass4_vectors(k9)[0], moments(k9)[1]
    dmean = dvar = jnp.full_like(mul, 0.01)
    count = u.shape[0] * u.shape[1] * u.shape[2]
    return dbn.bn_backward_coeffs(mul, rstd, *sums[:2], dmean, dvar, count)

  def bwd_walk(u, dx, k9):  # ((dc, sg, sgx, tg), du_bn's operands but u and k9)
    mul, add, _, _, mean = pass4_vectors(k9)
    dc, du_g, sums = stencil.bwd(u, dx, dx, k9, mul, add, mean, moments(k9)[1],
                                 interpret=interpret)
    return (dc, *sums), (*bwd_coefficients(u, k9, sums), mean, du_g)

  def bwd_du(u, k9, cx, c0, mean, du_g):
    return stencil.du_bn(u, k9, cx, c0, mean, du_g, u.dtype, interpret=interpret)

  def backward(u, dx, k9, form):  # dx as c and dp; returns (dc, du, sg, sgx, tg)
    mul, add, _, _, mean = pass4_vectors(k9)
    rstd = moments(k9)[1]
    if form == "pallas":
      sums = stencil.bn_sums(u, dx, dx, k9, mean, rstd, stride, interpret)
    else:
      sums = dbn._xla_backward_sums(u, dx, dx, k9, mul, add, mean, rstd, stride, 1,
                                    with_dc=False)[1:]
    cx, c0 = bwd_coefficients(u, k9, sums)
    d, dc = dbn._xla_backward_dx(u, dx, dx, k9, mul, cx, c0, mean, stride, 1, u.dtype,
                                 add=add)
    du = (stencil.d_transpose(d, k9, stride, hw, out_dtype=u.dtype, interpret=interpret)
          if form == "pallas" else
          dbn._d_transpose(d, k9, stride, hw, "gather").astype(u.dtype))
    return (dc, du, *sums)
  return {
      ("stats", "xla"): lambda u, dx, k9: dbn._xla_stats(u, k9, stride, 1)[2],
      ("stats", "pallas"): lambda u, dx, k9: stencil.tap_stats(u, stride, interpret),
      ("stats", "pallas_gram"): lambda u, dx, k9: stencil.tap_stats(u, stride, interpret,
                                                                     lags=False),
      ("stats", "pallas_dot"): lambda u, dx, k9: stencil.tap_stats(u, stride, interpret,
                                                                    dot=True),
      ("sums", "xla"): lambda u, dx, k9: dbn._xla_backward_sums(
          u, dx, dx, k9, *moments(k9), *moments(k9), stride, 1)[1:],
      ("sums", "pallas"): lambda u, dx, k9: stencil.bn_sums(
          u, dx, dx, k9, *moments(k9), stride, interpret),
      ("sums", "pallas_xhat"): lambda u, dx, k9: stencil.bn_sums(
          u, dx, dx, k9, *moments(k9), stride, interpret, xhat=True),
      ("sums", "pallas_dot"): lambda u, dx, k9: stencil.bn_sums(
          u, dx, dx, k9, *moments(k9), stride, interpret, dot=True),
      ("du", "gather"): lambda u, dx, k9: dbn._d_transpose(
          dx, k9, stride, hw, "gather").astype(u.dtype),
      ("du", "autodiff"): lambda u, dx, k9: dbn._d_transpose(
          dx, k9, stride, hw, "autodiff").astype(u.dtype),
      ("du", "pallas"): lambda u, dx, k9: stencil.d_transpose(
          dx, k9, stride, hw, out_dtype=jnp.bfloat16, interpret=interpret),
      ("du", "pallas_dot"): lambda u, dx, k9: stencil.d_transpose(
          dx, k9, stride, hw, out_dtype=jnp.bfloat16, interpret=interpret, dot=True),
      ("dx_du", "xla"): lambda u, dx, k9: pass4_then_du(u, dx, k9, "gather"),
      ("dx_du", "pallas"): lambda u, dx, k9: pass4_then_du(u, dx, k9, "pallas"),
      ("dx_du", "pallas_rows"): lambda u, dx, k9: stencil.dx_du(
          u, dx, dx, k9, *pass4_vectors(k9), u.dtype, interpret=interpret),
      ("bwd", "xla"): lambda u, dx, k9: backward(u, dx, k9, "xla"),
      ("bwd", "pallas"): lambda u, dx, k9: backward(u, dx, k9, "pallas"),
      # Two programs: du_bn's is the same for both of bwd's tilings (its own tiling is
      # the default), so it is compiled once a shape and ROWS_AHEAD (12-15 s at stage 1).
      ("bwd", "pallas_rows"): TwoPrograms(bwd_walk, bwd_du, place=1),
      ("product", "xla"): lambda u, dx, k9: dbn._xla_apply(
          u, dx, k9, *moments(k9), stride, 1),
      ("product", "pallas"): lambda u, dx, k9: stencil.product(
          u, dx, k9, *moments(k9), stride, interpret),
      ("product", "pallas_dot"): lambda u, dx, k9: stencil.product(
          u, dx, k9, *moments(k9), stride, interpret, dot=True),
  }


class TwoPrograms(NamedTuple):
  """An entry run as two programs, compiled apart: ``first(u, dx, k9)`` gives
  ``(outputs, operands)``, ``second(u, k9, *operands)`` one more output, put at
  ``place`` among the first's. ``time_shape`` compiles ``second`` once a shape and form
  (the entries of one form differ only in ``first``'s tiling) and times the two back to
  back. bwd's walk then du_bn: compiled as one program, du_bn (12-15 s at stage 1 on 2
  CPU cores, its unrolled trips; the walk ~1 s) was compiled again for each of bwd's
  tilings, 17-25 s of the sweep's 73-88 s a stride-1 shape (NOTES.md, experiment
  31)."""
  first: Callable
  second: Callable
  place: int


def _compile(fn, u, dx, k9, shared: dict, key):
  """(run(u, dx, k9), the compiled programs' text) for one entry. A TwoPrograms'
  second program comes from ``shared`` under ``key`` where an earlier entry compiled
  it."""
  import jax
  if not isinstance(fn, TwoPrograms):
    # A new function object for every entry: jax.jit caches a function's trace by the
    # object, so jitting the same one again under other settings would reuse the first
    # trace, and every tiling of a form would time the first tiling's kernel. Before
    # 2026-12-04 it did (benchmarks/NOTES.md, experiment 24).
    run = jax.jit(lambda *a: fn(*a)).lower(u, dx, k9).compile()
    return run, run.as_text()
  first = jax.jit(lambda *a: fn.first(*a)).lower(u, dx, k9).compile()
  if key not in shared:  # its operands as the first program gives them
    operands = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding)
                for s in first.out_info[1]]
    shared[key] = jax.jit(lambda *a: fn.second(*a)).lower(u, k9, *operands).compile()
  second = shared[key]

  def run(u, dx, k9):
    outputs, operands = first(u, dx, k9)
    outputs = list(outputs)
    outputs.insert(fn.place, second(u, k9, *operands))
    return tuple(outputs)
  return run, first.as_text() + second.as_text()


@contextlib.contextmanager
def _rows_ahead(ahead: bool):
  """``stencil.ROWS_AHEAD`` while a walk is traced, restored after."""
  from qlhs_jax.kernels import stencil
  old, stencil.ROWS_AHEAD = stencil.ROWS_AHEAD, ahead
  try:
    yield
  finally:
    stencil.ROWS_AHEAD = old


@contextlib.contextmanager
def _lowering_for(device):
  """Where ``device`` is a compile-only GPU: the Triton kernels, not their
  interpretation, and the device's mesh, from which Pallas reads the GPU (as
  ``benchmarks.aot`` lowers the train step)."""
  if device is None:
    yield
    return
  import jax

  from qlhs_jax.benchmarks import aot
  with aot.pallas_for_gpu(), jax.set_mesh(aot.single_device_mesh(device)):
    yield


def _rel(a, b) -> float:
  """Largest difference relative to b's largest value, over all arrays of a and b,
  reduced where the arrays are (float32): on the GPU a few reductions. NumPy's float64
  copies of a hidden-size output and its reference (dc at stage 1: 205M values, 1.6 GB
  each) took seconds of host time per entry, and a sweep has 23 such entries a stride-1
  shape (NOTES.md, experiment 30)."""
  import jax
  import jax.numpy as jnp
  xs, ys = jax.tree.leaves(a), jax.tree.leaves(b)
  if [x.shape for x in xs] != [y.shape for y in ys]:
    raise ValueError(f"the outputs' shapes {[x.shape for x in xs]} are not the XLA "
                     f"form's {[y.shape for y in ys]}")
  f32 = lambda x: jnp.asarray(x).astype(jnp.float32)
  diff = max(float(jnp.abs(f32(x) - f32(y)).max()) for x, y in zip(xs, ys))
  scale = max(float(jnp.abs(f32(y)).max()) for y in ys)
  return diff / max(scale, 1e-30)


# The Pallas forms a run may time (--forms); each kernel times those it has.
PALLAS_FORMS = ("pallas", "pallas_gram", "pallas_xhat", "pallas_rows", "pallas_rows_now",
                "pallas_dot")


def _print_entry(name: str, r: dict) -> None:
  if "ms" in r:
    flag = "  WRONG" if r["err"] > WRONG[name.split()[0]] else ""
    print(f"  {name:24s} {r['ms']:8.3f} ms  (vs the XLA form {r['err']:.1e}; compiled in "
          f"{r['compile_s']:.1f} s){flag}", flush=True)
  elif "compile_s" in r:
    print(f"  {name:24s} compiled in {r['compile_s']:6.1f} s  ({r['pallas_calls']} Pallas "
          f"kernels)", flush=True)
  else:
    print(f"  {name:24s} failed: {r['error']}", flush=True)


def time_shape(batch, side, n, stride, stats_tilings, sums_tilings, du_tilings, interpret,
               calls, repeats, kernels=KERNELS, forms=PALLAS_FORMS, on_entry=None,
               dx_du_tilings=DX_DU_TILINGS, product_tilings=PRODUCT_TILINGS,
               bwd_tilings=BWD_TILINGS, compile_on=None,
               sums_dot_tilings=SUMS_DOT_TILINGS,
               stats_dot_tilings=STATS_DOT_TILINGS,
               du_dot_tilings=DU_DOT_TILINGS,
               product_dot_tilings=PRODUCT_DOT_TILINGS, d_kernel="float32") -> dict:
  """{"kernel form[@tiling]": {"ms", "err", "compile_s"}} at one shape (err: against the
  XLA form), for the ``kernels`` named (each with its XLA forms, the reference) and
  their Pallas ``forms``. ``on_entry(name, result)`` sees each entry as soon as it is
  timed (main prints it: a run that its time limit stops mid-shape keeps what it
  timed).
  ``compile_on``: a compile-only GPU device (``benchmarks.aot``; ``interpret`` False):
  each entry is compiled for it, by the XLA and Triton that the GPU's jax runs, and not
  run: {"compile_s", "pallas_calls"} (the Pallas kernels in the compiled program).
  ``d_kernel`` "compute": D's kernel in bfloat16, as QLHS_D_KERNEL=compute gives it to
  every entry (the parts' products then take one part)."""
  import jax

  from qlhs_jax.benchmarks.block_tune import median_ms
  from qlhs_jax.benchmarks.step import kernel_env
  if compile_on is None:
    u, dx, k9 = _inputs(batch, side, n, stride, d_kernel=d_kernel)
  else:  # shapes on the device, no arrays
    on = jax.sharding.SingleDeviceSharding(compile_on)
    u, dx, k9 = (jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on)
                 for a in jax.eval_shape(lambda: _inputs(batch, side, n, stride,
                                                         d_kernel=d_kernel)))
  out, ref, shared = {}, {}, {}
  fns = _functions(stride, side, interpret)
  todo = [("stats", "xla", None), ("sums", "xla", None), ("du", "gather", None),
          ("du", "autodiff", None)]
  # At stride 2 "pallas" is the gram kernel too: timed under both names all the same, so
  # that each form's network total covers every shape.
  walks = ("pallas_rows", "pallas_rows_now")
  todo += [("stats", form, t) for form in ("pallas", "pallas_gram") + walks
           for t in stats_tilings]
  todo += [("sums", form, t) for form in ("pallas", "pallas_xhat") + walks
           for t in sums_tilings]
  todo += [("stats", "pallas_dot", t) for t in stats_dot_tilings]
  todo += [("sums", "pallas_dot", t) for t in sums_dot_tilings]
  todo += [("du", form, t) for form in ("pallas",) + walks for t in du_tilings]
  todo += [("du", "pallas_dot", t) for t in du_dot_tilings]
  if stride == 1:  # dx_du walks at stride 1 only; its "pallas" is the default's pair
    todo += [("dx_du", "xla", None), ("dx_du", "pallas", None)]
    todo += [("dx_du", form, t) for form in walks for t in dx_du_tilings]
    todo += [("bwd", "xla", None), ("bwd", "pallas", None)]
    todo += [("bwd", form, t) for form in walks for t in bwd_tilings]
  todo += [("product", "xla", None)]
  todo += [("product", form, t) for form in ("pallas",) + walks for t in product_tilings]
  todo += [("product", "pallas_dot", t) for t in product_dot_tilings]
  todo = [item for item in todo if item[0] in kernels
          and (item[2] is None or item[1] in forms)]
  for kernel, form, tiling in todo:
    name = f"{kernel} {form}" + (f"@{tiling}" if tiling else "")
    try:
      # The XLA sums as XLA reduces them, whatever QLHS_SUMS_FORM the shell has (unset,
      # "auto" would take the Pallas kernel on the GPU).
      # The walks are the "pallas" calls under QLHS_STENCIL_ROWS.
      walk = form.startswith("pallas_rows")
      fn = fns.get((kernel, "pallas_rows")) if walk else None  # dx_du, bwd: their own
      fn = fn or fns[kernel, "pallas" if walk else form]
      start = time.perf_counter()
      with kernel_env("QLHS_STENCIL_TILING",
                      f"{_tiling_key(kernel, form)}={tiling}" if tiling else ""), \
          kernel_env("QLHS_SUMS_FORM", "xla"), \
          kernel_env("QLHS_STENCIL_ROWS", kernel if walk else ""), \
          _rows_ahead(form != "pallas_rows_now"):
        with _lowering_for(compile_on):
          run, text = _compile(fn, u, dx, k9, shared, (kernel, form))
      compile_s = time.perf_counter() - start  # (what a sweep's time limit must allow)
      if compile_on is not None:  # not run; the Pallas kernels that it would launch
        out[name] = {"compile_s": compile_s,
                     "pallas_calls": text.count("__gpu$xla.gpu.triton")}
      else:
        got = run(u, dx, k9)
        if form in ("xla", "gather"):  # first in `todo`: each kernel's reference
          ref[kernel] = got
        err = _rel(got, ref[kernel])
        out[name] = {"ms": median_ms(run, (u, dx, k9), calls, repeats), "err": err,
                     "compile_s": compile_s}
    except Exception as ex:  # a tiling that does not compile is reported, not fatal
      out[name] = {"error": f"{type(ex).__name__}: {ex}"[:300]}
    if on_entry is not None:
      on_entry(name, out[name])
  return out


def _tiling_key(kernel: str, form: str) -> str:
  """The QLHS_STENCIL_TILING entry that an entry's tiling sets: the dot forms have their
  own (``sums_dot``, ``stats_dot``, ``du_dot``, ``product_dot``: stages where the
  others have splits or nothing)."""
  return f"{kernel}_dot" if form == "pallas_dot" else kernel


def best(results: dict, blocks: dict, kernel: str):
  """(fastest form@tiling over the shapes timed, its network ms, each form's) for one
  kernel: times weighted by each shape's blocks; a WRONG or failed entry never wins."""
  totals = {}
  for shape, times in results.items():
    for name, r in times.items():
      if not name.startswith(kernel + " "):
        continue
      ok = "ms" in r and r["err"] <= WRONG[kernel]
      totals.setdefault(name, 0.0)
      totals[name] = totals[name] + (r["ms"] * blocks[shape] if ok else float("inf"))
  if not totals:  # a kernel not timed (a record from before it existed)
    return None, float("inf"), totals
  name = min(totals, key=totals.get)
  return name, totals[name], totals


def _bwd_wins(results, blocks, rows) -> bool:
  """Whether bwd's two walks beat, over the stride-1 shapes timed, both the default
  step's three kernels ("bwd pallas") and what the sweep chose for the same work: pass
  3's sums at its chosen form and tiling, plus pass 4 and du as chosen (the dx_du walk
  where ``rows`` names it, else XLA's pass 4 and du's tiles, "dx_du pallas"). Where the
  chosen sums or dx_du entries were not timed at a shape, only the first counts."""
  name, ms, totals = best(results, blocks, "bwd")
  if name is None or not name.split()[1].startswith("pallas_rows") or ms == float("inf"):
    return False
  if ms >= totals.get("bwd pallas", float("inf")):
    return False
  sums = best(results, blocks, "sums")[0]
  dx_du = best(results, blocks, "dx_du")[0] if "dx_du" in rows else "dx_du pallas"
  other = 0.0
  for shape, times in results.items():
    if not any(k.startswith("bwd ") for k in times):
      continue  # a strided shape: bwd does not run there
    pair = [times.get(k, {}) for k in (sums, dx_du)]
    if not all("ms" in r for r in pair):
      return True  # not comparable: it beat the default's kernels
    other += sum(r["ms"] for r in pair) * blocks[shape]
  return ms < other


def spec_and_forms(results, blocks, d_kernel="float32") -> tuple[str, str]:
  """QLHS_STENCIL_TILING of the fastest Pallas tilings, and the form variables, each
  the fastest form, named explicitly (unset, a form is "auto": the kernels on a GPU),
  with QLHS_STENCIL_ROWS naming the kernels whose walk was fastest, and
  QLHS_D_KERNEL=compute where the run gave D's kernel so (``d_kernel``). A kernel not
  timed (--kernels) is left out: its variables stay as the environment has them."""
  spec, forms, rows = [], [], []
  for kernel, var in (("stats", "QLHS_STATS_FORM"), ("sums", "QLHS_SUMS_FORM"),
                      ("du", "QLHS_DU_FORM"), ("product", "QLHS_PRODUCT_FORM")):
    name, _, totals = best(results, blocks, kernel)
    if name is None:
      continue
    # The fastest tiling of each entry of QLHS_STENCIL_TILING: the dot forms' own.
    for key in (kernel, f"{kernel}_dot"):
      pallas = {k: v for k, v in totals.items()
                if "@" in k and _tiling_key(kernel, k.split()[1].split("@")[0]) == key}
      if pallas and min(pallas.values()) < float("inf"):
        spec.append(f"{key}={min(pallas, key=pallas.get).split('@')[1]}")
    form = name.split()[1].split("@")[0]
    if form.startswith("pallas_rows"):  # the Pallas form, walking rows
      form = "pallas"
      rows.append(kernel)
    forms.append(f"{var}={form}")
  # dx_du has no form variable: where its walk beats pass 4 then du, QLHS_STENCIL_ROWS
  # names it, with its tiling.
  name, _, _ = best(results, blocks, "dx_du")
  if name is not None and name.split()[1].startswith("pallas_rows"):
    spec.append(f"dx_du={name.split('@')[1]}")
    rows.append("dx_du")
    # It runs where du runs as Pallas (d_bn_product._dx_du_walks): a du choice of
    # XLA's form would switch it off unseen.
    forms = [f for f in forms if not f.startswith("QLHS_DU_FORM=")]
    forms.append("QLHS_DU_FORM=pallas")
  if _bwd_wins(results, blocks, rows):
    name, _, _ = best(results, blocks, "bwd")
    spec.append(f"bwd={name.split('@')[1]}")
    rows.append("bwd")
    # It runs where the sums and du run as Pallas (d_bn_product._bwd_walks), and takes
    # the place of the sums' walk and dx_du at stride 1.
    forms = [f for f in forms if not f.startswith(("QLHS_SUMS_FORM=", "QLHS_DU_FORM="))]
    forms += ["QLHS_SUMS_FORM=pallas", "QLHS_DU_FORM=pallas"]
  if rows:
    forms.append(f"QLHS_STENCIL_ROWS={','.join(rows)}")
  if d_kernel == "compute":
    forms.append("QLHS_D_KERNEL=compute")
  return " ".join(spec), " ".join(forms)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--size-scale", type=int, default=1, help="divide the 224-px sides")
  p.add_argument("--shapes", default="", help="comma-separated names (default all)")
  p.add_argument("--stats-tilings", nargs="+", default=list(STATS_TILINGS))
  p.add_argument("--sums-tilings", nargs="+", default=list(SUMS_TILINGS))
  p.add_argument("--du-tilings", nargs="+", default=list(DU_TILINGS))
  p.add_argument("--dx-du-tilings", nargs="+", default=list(DX_DU_TILINGS))
  p.add_argument("--bwd-tilings", nargs="+", default=list(BWD_TILINGS))
  p.add_argument("--product-tilings", nargs="+", default=list(PRODUCT_TILINGS))
  p.add_argument("--sums-dot-tilings", nargs="+", default=list(SUMS_DOT_TILINGS))
  p.add_argument("--stats-dot-tilings", nargs="+", default=list(STATS_DOT_TILINGS))
  p.add_argument("--du-dot-tilings", nargs="+", default=list(DU_DOT_TILINGS))
  p.add_argument("--product-dot-tilings", nargs="+", default=None,
                 help=f"default {' '.join(PRODUCT_DOT_TILINGS)}; with --d-kernel "
                      f"compute {' '.join(PRODUCT_DOT_ONE_PART_TILINGS)}")
  # (d_bn_product.D_KERNELS, not imported here: main imports JAX after the XLA flags)
  p.add_argument("--d-kernel", default="float32", choices=("float32", "compute"),
                 help="D's kernel as QLHS_D_KERNEL gives it to every entry: float32, or "
                      "compute (bfloat16: the product's products take one part)")
  p.add_argument("--budget", type=float, default=float("inf"),
                 help="seconds after which no new shape is started")
  p.add_argument("--calls", type=int, default=10)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--kernels", default=",".join(KERNELS),
                 help="comma-separated, of stats, sums, du, dx_du, bwd, product (default "
                      "all): the others are not run, e.g. under a profiler that follows "
                      "one kernel")
  p.add_argument("--forms", default=",".join(PALLAS_FORMS),
                 help="comma-separated Pallas forms to time (default all; the XLA forms "
                      "always run, the reference)")
  p.add_argument("--record", default=None, help="append a record to this JSON-lines file")
  p.add_argument("--compile-only", default=None, metavar="TARGET",
                 help="compile each entry for a GPU without one (a target of "
                      "benchmarks.aot, e.g. h100; needs JAX's CUDA plugin) and print the "
                      "seconds each compile took: what a sweep spends before it times")
  args = p.parse_args(argv)
  if args.product_dot_tilings is None:
    args.product_dot_tilings = list(PRODUCT_DOT_ONE_PART_TILINGS
                                    if args.d_kernel == "compute" else PRODUCT_DOT_TILINGS)
  from qlhs_jax import xla_options
  xla_options.request_from_env()  # before JAX starts, as the step harness does
  kernels = tuple(filter(None, args.kernels.split(",")))
  if not kernels or set(kernels) - set(KERNELS):
    p.error(f"--kernels {args.kernels!r}: name some of {', '.join(KERNELS)}")
  pallas_forms = tuple(filter(None, args.forms.split(",")))
  if not pallas_forms or set(pallas_forms) - set(PALLAS_FORMS):
    p.error(f"--forms {args.forms!r}: name some of {', '.join(PALLAS_FORMS)}")
  import jax

  from qlhs_jax.benchmarks.block_tune import block_shapes
  from qlhs_jax.benchmarks.step import kernel_env
  from qlhs_jax.kernels import stencil
  for kernel, items in (("stats", args.stats_tilings), ("sums", args.sums_tilings),
                        ("du", args.du_tilings), ("dx_du", args.dx_du_tilings),
                        ("bwd", args.bwd_tilings), ("product", args.product_tilings),
                        ("sums_dot", args.sums_dot_tilings),
                        ("stats_dot", args.stats_dot_tilings),
                        ("du_dot", args.du_dot_tilings),
                        ("product_dot", args.product_dot_tilings)):
    for t in items:  # a malformed tiling fails here, before any timing
      with kernel_env("QLHS_STENCIL_TILING", f"{kernel}={t}"):
        stencil.tiling(kernel)
  wanted = set(filter(None, args.shapes.split(",")))
  shapes = [s for s in block_shapes(args.size_scale) if not wanted or s[0] in wanted]
  compile_on = None
  if args.compile_only:  # each entry compiled for the GPU, not run
    if args.record:  # compile times are no timing of the kernels
      p.error("--compile-only records nothing: leave out --record")
    from qlhs_jax.benchmarks import aot
    if args.compile_only not in aot.TARGETS:
      raise SystemExit(f"--compile-only {args.compile_only!r}: the targets are "
                       f"{', '.join(aot.TARGETS)}")
    compile_on, interpret = aot.compile_only_device(args.compile_only), False
    print(f"stencil kernels compiled for {args.compile_only} (no device), jax "
          f"{jax.__version__}, batch {args.batch}, bfloat16, D's kernel "
          f"{args.d_kernel}")
  else:
    dev = jax.devices()[0]
    interpret = dev.platform == "cpu"
    print(f"stencil kernels on {dev.platform}:{dev.device_kind}, jax {jax.__version__}, "
          f"batch {args.batch}, bfloat16, D's kernel {args.d_kernel}"
          f"{' (interpreted)' if interpret else ''}")
  start, results, blocks, failed = time.perf_counter(), {}, {}, 0
  for name, side, n, _, stride, count in shapes:
    if time.perf_counter() - start > args.budget:
      print(f"budget of {args.budget:.0f} s spent: {name} and later shapes not "
            f"{'compiled' if compile_on else 'timed'}")
      break
    print(f"{name} ({side}x{side}x{n}, stride {stride}, {count} blocks):", flush=True)
    times = time_shape(args.batch, side, n, stride, args.stats_tilings, args.sums_tilings,
                       args.du_tilings, interpret, args.calls, args.repeats, kernels,
                       pallas_forms, on_entry=_print_entry,
                       dx_du_tilings=args.dx_du_tilings,
                       product_tilings=args.product_tilings, bwd_tilings=args.bwd_tilings,
                       compile_on=compile_on, sums_dot_tilings=args.sums_dot_tilings,
                       stats_dot_tilings=args.stats_dot_tilings,
                       du_dot_tilings=args.du_dot_tilings,
                       product_dot_tilings=args.product_dot_tilings,
                       d_kernel=args.d_kernel)
    if compile_on is not None:
      failed += _print_compiles(name, times)
      continue
    results[name], blocks[name] = times, count
    spec, forms = spec_and_forms(results, blocks, args.d_kernel)
    for kernel in kernels:
      choice, ms, totals = best(results, blocks, kernel)
      if kernel == "dx_du":  # against the default step's two kernels (stride-1 blocks)
        base = totals.get("dx_du pallas", float("inf"))
        print(f"  network so far, dx_du: {choice} {ms:.2f} ms (pass 4, then du's tiles: "
              f"{base:.2f} ms)")
        continue
      if kernel == "bwd":  # against the default step's three kernels (stride-1 blocks)
        base = totals.get("bwd pallas", float("inf"))
        print(f"  network so far, bwd: {choice} {ms:.2f} ms (the sums' tiles, pass 4, "
              f"du's tiles: {base:.2f} ms)")
        continue
      xla = totals.get(f"{kernel} {'gather' if kernel == 'du' else 'xla'}", float("inf"))
      print(f"  network so far, {kernel}: {choice} {ms:.2f} ms (default form {xla:.2f} ms)")
    print(f"stencil_tiling: {spec}")
    print(f"stencil_forms: {forms}", flush=True)
  if compile_on is not None:  # exit status 1 where an entry did not compile
    print(f"all shapes: {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0
  if args.record and results:
    from qlhs_jax.benchmarks.step import append_records
    spec, forms = spec_and_forms(results, blocks, args.d_kernel)
    append_records(args.record, [{
        "kind": "stencil_times", "date": datetime.date.today().isoformat(),
        "device": f"{dev.platform}:{dev.device_kind}", "jax": jax.__version__,
        "batch": args.batch, "size_scale": args.size_scale, "blocks": blocks,
        "d_kernel": args.d_kernel,
        "shapes": results, "spec": spec, "forms": forms,
        "xla_fma": xla_options.fma_in_flags()}])
  return 0


def _print_compiles(name: str, entries: dict) -> int:
  """--compile-only's line after a shape: its compile seconds, in all and by kernel (on
  the GPU a sweep compiles every entry before it times it; its budget and time limit
  count both); returns how many entries did not compile."""
  seconds = {}
  for entry, r in entries.items():
    kernel = entry.split()[0]
    seconds[kernel] = seconds.get(kernel, 0.0) + r.get("compile_s", 0.0)
  failed = sum("error" in r for r in entries.values())
  print(f"  compiles at {name}: {sum(seconds.values()):.1f} s for {len(entries)} entries "
        f"({failed} failed); " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()),
        flush=True)
  return failed


if __name__ == "__main__":
  sys.exit(main())
