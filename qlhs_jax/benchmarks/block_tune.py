"""Where ``fuse_d_bn="block"``'s kernels are fast: their tiles and widths, timed on the GPU.

  python -m qlhs_jax.benchmarks.block_tune [--batch 256] [--tilings PIXELS,WARPS ...]
      [--budget 60] [--record FILE]
  python -m qlhs_jax.benchmarks.block_tune --l2     # no GPU: the on-chip traffic estimate

For each block shape of Eq.(3) at 224 px (``benchmarks.fused.EQ3_SHAPES``; each input
width's largest shape first, so that every width is reached early), on random inputs in
bfloat16 at ``--batch``:

1. It times each of the three kernels of ``kernels.eq3_block`` (forward, sums, dx)
   alone at every tiling (pixels per tile, warps) of ``--tilings`` (default
   :data:`DEFAULT_TILINGS`; at input widths of at least 256 also ``--wide-tilings``,
   :data:`WIDE_TILINGS`) plus the one QLHS_BLOCK_TILING gives now; tilings that the
   plan caps to the same tile (at most 8,192 accumulator values, at most the rows) are
   timed once. Each time is a median over ``--repeats`` runs of ``--calls``
   back-to-back calls; the kernels of one shape compile in parallel threads.
2. It times the block's whole hidden path ``A(BN(D u) * (C u))``, forward and
   backward, as "block" (the kernels, at the tiles just chosen) and as "xla"
   (``d_bn_product(impl="xla")`` between XLA's matmuls, as the model runs it).

After each shape it prints two lines, each complete on its own, so a run that its time
limit stops still leaves usable values:
- ``tiling: SPEC``: QLHS_BLOCK_TILING with each kernel's fastest tiling at the shapes
  timed so far (the default elsewhere);
- ``block_max_width: N``: the model option that gives the network the smallest
  hidden-path time over the shapes timed so far. Blocks wider than N take "xla"; 0 means
  every block runs the kernels.

``benchmarks/gpu_h100.sh step`` passes both to its "block" row. No new shape is started
after ``--budget`` seconds.

Why widths matter: the forward and dx kernels keep their (pixels, n_out) accumulator in
registers, so a tile has at most 8,192/n pixels, and each tile reloads both 1x1 weight
matrices (16 n^2 bytes in bfloat16). Their on-chip (L2) traffic per pixel therefore
grows as n^3. The sums kernel re-reads u and dy once per slice of hidden channels.
``--l2`` prints these estimates next to the bytes the kernels must move through device
memory; benchmarks/NOTES.md, experiment 9.

It times; it does not check numbers: run ``benchmarks.block_check`` with the printed
SPEC. Each kernel's GB/s uses the bytes ``benchmarks.hlo_bytes`` counts (operands and
results). On a CPU the kernels run interpreted (for a smoke run: ``--batch 2
--size-scale 8``; the times mean nothing).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import math
import os
import sys
import time

KERNEL_NAMES = ("forward", "sums", "dx")
# Compiled for an H100 (benchmarks.triton_compile --op eq3_block): 32,8 spills nothing at
# stages 1-2 (the default 64,8: 808 B a thread in stage 1's sums kernel), 4 warps spill
# up to 1.6 KB at stages 3-4; which is fastest is the GPU's question (NOTES, exp. 9).
DEFAULT_TILINGS = ((32, 4), (32, 8), (64, 4), (64, 8), (128, 8))
# 16 warps, tried only where the input has at least WIDE_MIN_N channels: ptxas caps a
# 16-warp program at 128 registers a thread. At the tiles the plan allows there (32
# pixels at stage 3, 16 at stage 4) the kernels spill at most 16 B at stage 3 and 152 B
# in stage 4's dx kernel, with twice the resident warps per SM of 8 warps to hide the
# weights' L2 re-reads; at stages 1-2 they spill up to 2 KB (NOTES, experiment 10).
WIDE_TILINGS = ((64, 16),)
WIDE_MIN_N = 256


def block_shapes(size_scale: int = 1):
  """``[(name, side, n, n_out, stride, blocks)]`` of Eq.(3) ws x4 at 224 px (sides
  divided by ``size_scale``): for each input width n the shape with the most traffic
  (output pixels x n_out x blocks), widths in increasing order, then the others."""
  from qlhs_jax.benchmarks.fused import EQ3_SHAPES, eq3_n_out
  shapes = [(name, max(1, side // size_scale), n, eq3_n_out(n, stride), stride, count)
            for name, side, n, stride, count in EQ3_SHAPES]
  traffic = lambda s: (s[1] // s[4]) ** 2 * s[3] * s[5]
  rank = {s[0]: sum(1 for o in shapes if o[2] == s[2] and traffic(o) > traffic(s))
          for s in shapes}
  return sorted(shapes, key=lambda s: (rank[s[0]], s[2]))


def arg_shapes(kernel: str, plan: dict, dtype=None):
  """Shapes and dtypes of ``eq3_block.CALLS[kernel]``'s arguments for ``plan``: u rows
  and dy rows in ``dtype`` (bfloat16), the weight slices as ``eq3_hidden`` makes them
  (C_s, A_s in ``dtype``, D's taps float32), per-channel float32 vectors."""
  import jax
  import jax.numpy as jnp
  dtype = dtype or jnp.bfloat16
  n, e, n_out = plan["n"], plan["e"], plan["n_out"]
  sds = jax.ShapeDtypeStruct
  vec = sds((e, n), jnp.float32)
  weights = (sds((e, n, n), dtype), sds((e, n, n_out), dtype),
             sds((e, 9, n), jnp.float32), vec, vec)  # C_s, A_s, D_s, mul, add
  u2 = sds((plan["b"] * plan["h"] * plan["w"], n), dtype)
  if kernel == "forward":
    return (u2, *weights)
  dy = sds((plan["tiles"] * plan["m"], n_out), dtype)
  return (u2, dy, *weights, *(vec,) * (2 if kernel == "sums" else 3))  # mean, rstd | cx, c0


def l2_gbytes(kernel: str, plan: dict, itemsize: int = 2) -> float:
  """GB a kernel reads on chip beyond its operands (an estimate). The forward and dx
  kernels load both 1x1 weight matrices, C (n, n*e) and A (n*e, n_out), once per
  tile. The sums kernel reads u and dy once per slice of bj hidden channels
  ((n / bj) * e slices); its weight slices are read once per program (left out)."""
  n, e, n_out = plan["n"], plan["e"], plan["n_out"]
  if kernel in ("forward", "dx"):
    return plan["tiles"] * (n * n * e + n * e * n_out) * itemsize / 1e9
  slices = (n // plan["bj"]) * e
  return slices * (plan["b"] * plan["h"] * plan["w"] * n
                   + plan["rows"] * n_out) * itemsize / 1e9


def kernel_args(kernel: str, plan: dict, seed: int = 0):
  """Random arguments of ``arg_shapes``' shapes on the default device (the kernels'
  time does not depend on the values: no branch reads them)."""
  import jax
  shapes = arg_shapes(kernel, plan)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  return tuple(jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, shapes))


def _nbytes(tree) -> int:
  import jax
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def io_bytes(kernel: str, plan: dict, args) -> int:
  """Bytes of a kernel's operands ``args`` (arrays or shapes) and of its results: what
  it must move through device memory, as ``benchmarks.hlo_bytes`` counts it."""
  import jax

  from qlhs_jax.kernels import eq3_block
  out = jax.eval_shape(lambda *a: eq3_block.CALLS[kernel](plan, a, True), *args)
  return _nbytes(args) + _nbytes(out)


def _failure(ex: Exception) -> str:
  """An exception's type and the first 300 characters of its message, for the log."""
  return f"{type(ex).__name__}: {str(ex)[:300]}"


def compile_kernel(kernel: str, plan: dict, interpret: bool):
  """``(run, args, bytes)``: the kernel alone, compiled for ``plan``, its arguments and
  the bytes of its operands and results."""
  import jax

  from qlhs_jax.kernels import eq3_block
  call = eq3_block.CALLS[kernel]
  args = kernel_args(kernel, plan)
  fn = jax.jit(lambda *a: call(plan, a, interpret))
  run = fn.lower(*args).compile()
  return run, args, io_bytes(kernel, plan, args)


def median_ms(run, args, calls: int, repeats: int) -> float:
  """Median over ``repeats`` of the mean time of ``calls`` back-to-back calls (one sync
  at the end of each: the dispatch of one call overlaps the run of the previous)."""
  import jax
  jax.block_until_ready(run(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = run(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / calls)
  times.sort()
  return 1e3 * times[len(times) // 2]


def spec_of(best: dict, defaults: dict | None = None) -> str:
  """QLHS_BLOCK_TILING of ``best`` ({(kernel, shape key): tiling}): one
  ``kernel@key=pixels,warps[,channels]`` entry per choice that differs from what the
  default gives there (``defaults``, same keys; else eq3_block.DEFAULT_TILING), or
  the default alone when none does."""
  from qlhs_jax.kernels import eq3_block
  default = tuple(eq3_block.DEFAULT_TILING)
  defaults = defaults or {}
  entries = [f"{k}@{key}=" + ",".join(map(str, t)) for (k, key), t in sorted(best.items())
             if tuple(t) != tuple(defaults.get((k, key), default))]
  return " ".join(entries) or ",".join(map(str, default))


def candidates(kernel: str, current, tilings, auto_channels: int, n: int):
  """Tilings to time: the current one first, then ``tilings``; for the sums kernel each
  also at 2x and 4x its automatic channels per slice (at most n): fewer slices, so
  fewer re-reads of u and dy, for more registers."""
  out = []
  for t in [tuple(current), *tilings]:
    out.append(t)
    if kernel == "sums":
      out += [t[:2] + (c,) for c in (2 * auto_channels, 4 * auto_channels) if c <= n]
  return out


def best_max_width(paths) -> int | None:
  """``block_max_width`` from ``[(n, blocks, block_ms, xla_ms)]`` (hidden path times of
  the shapes timed; None where one failed, which then counts as infinitely slow): the
  threshold t with the smallest sum of blocks x (block_ms if n <= t else xla_ms), larger
  t first on a tie. 0 (no limit) where every width timed is best on the kernels; 1 where
  none is (every block takes "xla"). None before any shape has a time."""
  inf = float("inf")
  rows = [(n, b, inf if bl is None else bl, inf if xl is None else xl)
          for n, b, bl, xl in paths if bl is not None or xl is not None]
  if not rows:
    return None
  widths = sorted({r[0] for r in rows})
  total = lambda t: sum(b * (bl if n <= t else xl) for n, b, bl, xl in rows)
  best = min(reversed([1] + widths), key=total)
  return 0 if best == widths[-1] else best


def tune(shapes, batch: int, tilings, time_kernel, budget_s: float = float("inf"),
         e: int = 4, log=print, time_paths=None, wide_tilings=()) -> dict:
  """For each shape (``block_shapes``' rows; ``wide_tilings`` join ``tilings`` where
  n >= WIDE_MIN_N), ``time_kernel({(kernel, tiling): plan})``
  -> ``{(kernel, tiling): (ms, bytes) or None}`` (None: it failed); picks each kernel's
  fastest tiling. Then, if given, ``time_paths(u_shape, n_out, stride, spec)`` ->
  ``{"block": ms, "xla": ms}`` (None where one failed), the hidden path forward and
  backward with the tiles chosen so far. Returns ``{"shapes": [...], "spec": str,
  "block_max_width": int or None, "network_ms": {"current": .., "tuned": ..}}``;
  prints ``tiling: SPEC`` and ``block_max_width: N`` after every shape."""
  from qlhs_jax.kernels import eq3_block
  start, best, defaults, rows, paths = time.perf_counter(), {}, {}, [], []
  total = {"current": 0.0, "tuned": 0.0}
  for name, side, n, n_out, stride, count in shapes:
    if rows and time.perf_counter() - start > budget_s:  # the first shape always runs
      log(f"budget of {budget_s:.0f} s spent: {name} and later shapes keep their tiling")
      break
    key = eq3_block.shape_key(side, side, n, n_out, stride)
    u_shape = (batch, side, side, n)
    # Tilings as the plan has them: the tile is capped by the accumulator's size and
    # the rows (at stage 4, 16 pixels whatever is asked), so candidates that give the
    # same kernel are compiled and timed once.
    plan = lambda k, t: eq3_block._plan(u_shape, n_out, e, stride, k, tile=t)
    tile_of = lambda k, p: (p["m"], p["warps"]) + ((p["bj"],) if k == "sums" else ())
    effective = lambda k, t: tile_of(k, plan(k, t))
    auto = plan("sums", eq3_block.DEFAULT_TILING)["bj"]
    tried = [*tilings, *(wide_tilings if n >= WIDE_MIN_N else ())]
    todo = {}
    for k in KERNEL_NAMES:
      defaults[(k, key)] = effective(k, eq3_block.DEFAULT_TILING)
      for t in candidates(k, eq3_block.tiling(k, key), tried, auto, n):
        p = plan(k, t)
        todo.setdefault((k, tile_of(k, p)), p)
    timed = time_kernel(todo)
    log(f"{name} ({key}, {count} blocks, batch {batch}): ms (GB/s), L2 GB (estimate)")
    row = {"name": name, "key": key, "n": n, "blocks": count, "kernels": {}}
    for k in KERNEL_NAMES:
      current = effective(k, eq3_block.tiling(k, key))
      got = {t: timed[(kk, t)] for (kk, t) in todo if kk == k}
      ok = {t: v for t, v in got.items() if v is not None}
      name_of = lambda t: ",".join(map(str, t))
      cells = "  ".join(
          f"{name_of(t)}: " + ("failed" if v is None else
                               f"{v[0]:.3f} ({v[1] / v[0] / 1e6:.0f})")
          for t, v in got.items())
      if not ok:
        log(f"  {k:8s} {cells}  -> every tiling failed; left at the default")
        continue
      pick = min(ok, key=lambda t: ok[t][0])
      best[(k, key)] = pick
      log(f"  {k:8s} {cells}  -> {name_of(pick)} "
          f"(L2 ~{l2_gbytes(k, todo[(k, pick)]):.2f})")
      row["kernels"][k] = {name_of(t): (None if v is None else v[0])
                           for t, v in got.items()}
      if current in ok:
        total["current"] += count * ok[current][0]
        total["tuned"] += count * ok[pick][0]
    spec = spec_of(best, defaults)
    if time_paths is not None:
      ms = time_paths(u_shape, n_out, stride, spec)
      row["hidden_path_ms"] = ms
      paths.append((n, count, ms.get("block"), ms.get("xla")))
      fmt = lambda v: "failed" if v is None else f"{v:.3f} ms"
      log(f"  hidden path forward+backward: block {fmt(ms.get('block'))}, "
          f"xla {fmt(ms.get('xla'))}")
    rows.append(row)
    log(f"tiling: {spec}")
    width = best_max_width(paths)
    if width is not None:
      log(f"block_max_width: {width}")
  log(f"the kernels over the blocks timed: {total['current']:.2f} ms with the current "
      f"tiling, {total['tuned']:.2f} ms tuned")
  width = best_max_width(paths)
  done = [r for r in paths if r[2] is not None and r[3] is not None]
  if done:
    path_ms = {"block": sum(b * bl for _, b, bl, _ in done),
               "xla": sum(b * xl for _, b, _, xl in done),
               "chosen": sum(b * (bl if not width or n <= width else xl)
                             for n, b, bl, xl in done)}
    total.update({f"hidden_path_{k}": v for k, v in path_ms.items()})
    log(f"hidden paths over the blocks timed: every block on the kernels "
        f"{path_ms['block']:.2f} ms, every block on 'xla' {path_ms['xla']:.2f} ms, "
        f"block_max_width={width}: {path_ms['chosen']:.2f} ms")
  return {"shapes": rows, "spec": spec_of(best, defaults), "block_max_width": width,
          "network_ms": total}


def hidden_path(impl: str, stride: int, interpret: bool):
  """``(u, C, A, kernel, scale, bias, dy) -> gradients``: the block's hidden path
  ``A(BN(D u) * (C u))`` forward and backward, as "block" (``eq3_block.eq3_hidden``) or
  "xla" (``d_bn_product(impl="xla")`` between XLA's matmuls, as the model runs it)."""
  import jax
  import jax.numpy as jnp

  from qlhs_jax.kernels import d_bn_product as dbn
  from qlhs_jax.kernels import eq3_block
  from qlhs_jax.models.common import BN_EPS

  def forward(u, cw, aw, kernel, scale, bias):
    if impl == "block":
      return eq3_block.eq3_hidden(u, cw, aw, kernel, scale, bias, stride=stride,
                                  eps=BN_EPS, interpret=interpret)[0]
    c = jnp.dot(u[:, ::stride, ::stride], cw)
    p = dbn.d_bn_product(u, c, kernel, scale, bias, stride=stride, eps=BN_EPS,
                         impl="xla")[0]
    return jnp.dot(p, aw)

  def fwd_bwd(*args):
    y, vjp = jax.vjp(forward, *args[:-1])
    return vjp(args[-1].astype(y.dtype))
  return fwd_bwd


def path_args(u_shape, n_out: int, stride: int, e: int = 4, seed: int = 1):
  """Random (u, C, A, kernel, scale, bias, dy) for ``hidden_path``, bfloat16 activations
  and matmul weights, float32 D kernel and BatchNorm parameters."""
  import jax
  import jax.numpy as jnp

  from qlhs_jax.models.layers import _out_size
  b, h, w, n = u_shape
  ho, wo = _out_size(h, stride), _out_size(w, stride)
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  bf, f32 = jnp.bfloat16, jnp.float32
  return (jax.random.normal(ks[0], u_shape, bf),
          jax.random.normal(ks[1], (n, n * e), bf) / n ** 0.5,
          jax.random.normal(ks[2], (n * e, n_out), bf) / (n * e) ** 0.5,
          jax.random.normal(ks[3], (3, 3, 1, e), f32),
          1 + 0.1 * jax.random.normal(ks[4], (n * e,), f32),
          jax.random.normal(ks[5], (n * e,), f32),
          jax.random.normal(ks[6], (b, ho, wo, n_out), bf))


def time_paths_on_device(u_shape, n_out, stride, spec, interpret, calls, repeats) -> dict:
  """``{"block": ms, "xla": ms}`` of ``hidden_path`` (None where one fails), "block"
  traced under QLHS_BLOCK_TILING=spec; the two compile in parallel."""
  import jax
  from qlhs_jax.benchmarks.step import kernel_env
  args = path_args(u_shape, n_out, stride)
  out, lowered = {}, {}
  with kernel_env("QLHS_BLOCK_TILING", spec):  # read while tracing
    for impl in ("block", "xla"):
      try:
        lowered[impl] = jax.jit(hidden_path(impl, stride, interpret)).lower(*args)
      except Exception as ex:  # reported; the other path still counts
        print(f"  hidden path {impl}: {_failure(ex)}")

  def compile_(impl):
    try:
      return lowered[impl].compile()
    except Exception as ex:
      print(f"  hidden path {impl}: {_failure(ex)}")
      return None
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    compiled = dict(zip(lowered, pool.map(compile_, lowered)))
  for impl in ("block", "xla"):
    out[impl] = None
    if compiled.get(impl) is not None:
      try:
        out[impl] = median_ms(compiled[impl], args, calls, repeats)
      except Exception as ex:
        print(f"  hidden path {impl}: {_failure(ex)}")
  return out


def l2_table(shapes, batch: int, e: int = 4, log=print) -> float:
  """Per shape and kernel at the current tiling: the bytes the kernel moves through
  device memory (operands and results) and the on-chip re-reads of ``l2_gbytes``,
  summed over the shape's blocks; returns the re-reads' total over the network (GB)."""
  from qlhs_jax.kernels import eq3_block
  log(f"eq3_block kernels at batch {batch}, bfloat16, QLHS_BLOCK_TILING="
      f"{os.environ.get('QLHS_BLOCK_TILING', '')!r}: GB per block (device memory | on-chip "
      f"re-reads, estimate)")
  total, by_width = {"hbm": 0.0, "l2": 0.0}, {}
  for name, side, n, n_out, stride, count in shapes:
    key = eq3_block.shape_key(side, side, n, n_out, stride)
    cells = []
    for k in KERNEL_NAMES:
      plan = eq3_block._plan((batch, side, side, n), n_out, e, stride, k)
      args = arg_shapes(k, plan)
      hbm = io_bytes(k, plan, args) / 1e9
      l2 = l2_gbytes(k, plan)
      total["hbm"] += count * hbm
      total["l2"] += count * l2
      by_width[n] = by_width.get(n, 0.0) + count * l2
      cells.append(f"{k} {plan['m']},{plan['warps']}: {hbm:.3f} | {l2:.2f}")
    log(f"  {name:14s} {key:17s} x{count}  " + "   ".join(cells))
  log(f"network (the blocks' kernels): {total['hbm']:.1f} GB through device memory, "
      f"~{total['l2']:.1f} GB of on-chip re-reads")
  widths = sorted(by_width)
  log("on-chip re-reads by block_max_width: " + ", ".join(
      f"{w if w < widths[-1] else 0}: {sum(by_width[v] for v in widths if v <= w):.1f} GB"
      for w in widths))
  return total["l2"]


def time_on_device(todo: dict, interpret: bool, calls: int, repeats: int,
                   threads: int = min(16, os.cpu_count() or 1)) -> dict:
  """``{(kernel, tiling): (ms, bytes) or None}``: ``todo``'s plans compiled in parallel
  threads (XLA and Triton compile outside the GIL), then timed one after another."""
  def build(item):
    (k, _), plan = item
    try:
      return compile_kernel(k, plan, interpret)
    except Exception as ex:  # a tiling Triton cannot compile (shared memory, ...)
      print(f"  {k} {plan['m']},{plan['warps']}: {_failure(ex)}")
      return None
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    built = dict(zip(todo, pool.map(build, todo.items())))
  out = {}
  for kt, b in built.items():
    if b is None:
      out[kt] = None
      continue
    run, args, nbytes = b
    try:
      out[kt] = (median_ms(run, args, calls, repeats), nbytes)
    except Exception as ex:  # a launch failure: reported, not chosen
      print(f"  {kt}: {_failure(ex)}")
      out[kt] = None
  return out


def parse_tilings(items, flag: str = "--tilings") -> list[tuple[int, int]]:
  """``["64,8", ...]`` as ``[(64, 8), ...]``; refused as QLHS_BLOCK_TILING would refuse
  them (pixels a power of two >= 16, warps 1-16)."""
  from qlhs_jax.kernels import eq3_block
  out = []
  for item in items:
    try:
      m, w = eq3_block.parse_tiling(item)[""]
    except (ValueError, KeyError):
      raise SystemExit(f"{flag} {item!r}: want pixels,warps, e.g. 64,8 (pixels a power "
                       f"of two >= 16, warps 1, 2, 4, 8 or 16)") from None
    out.append((m, w))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--size-scale", type=int, default=1, help="divide the 224-px sides")
  p.add_argument("--tilings", nargs="+", default=[f"{m},{w}" for m, w in DEFAULT_TILINGS])
  p.add_argument("--wide-tilings", nargs="*",
                 default=[f"{m},{w}" for m, w in WIDE_TILINGS],
                 help=f"tried as well where the input has >= {WIDE_MIN_N} channels "
                      f"(none: give the flag alone)")
  p.add_argument("--shapes", default="", help="comma-separated names (default all)")
  p.add_argument("--budget", type=float, default=float("inf"),
                 help="seconds after which no new shape is started")
  p.add_argument("--calls", type=int, default=10)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--no-paths", action="store_true",
                 help="time the kernels only, not the hidden path against 'xla'")
  p.add_argument("--l2", action="store_true",
                 help="print the kernels' device-memory bytes and on-chip re-reads (an "
                      "estimate) at the current tiling; no timing, no GPU needed")
  p.add_argument("--record", default=None, help="append a record to this JSON-lines file")
  args = p.parse_args(argv)
  from qlhs_jax import xla_options
  xla_options.request_from_env()  # before JAX starts, as the step harness does
  import jax

  from qlhs_jax.kernels import eq3_block
  tilings = parse_tilings(args.tilings)
  wide_tilings = parse_tilings(args.wide_tilings, "--wide-tilings")
  wanted = set(filter(None, args.shapes.split(",")))
  shapes = [s for s in block_shapes(args.size_scale) if not wanted or s[0] in wanted]
  eq3_block.tiling()  # a malformed QLHS_BLOCK_TILING fails here, not per kernel
  if args.l2:
    l2_table(shapes, args.batch)
    return 0
  dev = jax.devices()[0]
  interpret = dev.platform == "cpu"
  print(f"eq3_block kernels on {dev.platform}:{dev.device_kind}, jax {jax.__version__}, "
        f"bfloat16{' (interpreted)' if interpret else ''}")
  time_paths = None if args.no_paths else (
      lambda u_shape, n_out, stride, spec: time_paths_on_device(
          u_shape, n_out, stride, spec, interpret, args.calls, args.repeats))
  result = tune(shapes, args.batch, tilings,
                lambda todo: time_on_device(todo, interpret, args.calls, args.repeats),
                args.budget, time_paths=time_paths, wide_tilings=wide_tilings)
  if args.record:
    from qlhs_jax.benchmarks.step import append_records
    append_records(args.record, [{
        "kind": "block_tune", "date": datetime.date.today().isoformat(),
        "device": f"{dev.platform}:{dev.device_kind}", "jax": jax.__version__,
        "batch": args.batch, "size_scale": args.size_scale, **result}])
  return 0


if __name__ == "__main__":
  sys.exit(main())
