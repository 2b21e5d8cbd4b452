"""The operation ``BN(D u) * c`` alone, per implementation: agreement, then time.

  python -m qlhs_jax.benchmarks.fused [--batch 256] [--steps 20] [--passes] [--record FILE]

For each hidden-tensor shape of Eq.(3) (ws, x4) at 224 px (stage 1, the stride-2 first
blocks, stages 2-4), runs forward + backward of ``qlhs_jax.kernels.d_bn_product`` with
``impl`` "none" (autodiff of ``reference``: what the model does with fuse_d_bn="none"),
"xla" and "pallas". First it checks, in float32 at ``--check-batch``, that "xla" and
"pallas" give the reference's outputs and gradients (relative error < 1e-4; exit code 1
otherwise, also when one fails to compile: the others are still checked and timed). Then it times each in bfloat16 at ``--batch`` (median of ``--steps``) and
sums the per-block times over the network's 16 blocks: the part of a train step that
fusing changes. On a CPU the Pallas kernels run in interpret mode (implied there; use a
``--size-scale`` of 8 or so; CPU times are meaningful only as ratios within one run).
``--passes`` also times each pass alone (the pad of u, statistics, apply, backward sums,
dx, du = D^T dx in both forms) with the bytes it must move, to show which one misses the
bandwidth. ``--weights`` checks the operation given C's and A's weights instead of c
(``c_weights``, ``a``: y = (BN(D u) * C u) @ A, plus u at stride 1 as the block's
shortcut adds it, and the gradients of u, C, D's kernel, BatchNorm's scale and bias and
A), so that QLHS_C_FORM, QLHS_DP_FORM and QLHS_WEIGHT_GRADS make c, dp and the weight
gradients in the kernels, and QLHS_DU_SUM adds u's shares in du's kernel, against float64
autodiff of the model's matmuls around the reference; ``--check-only`` stops after the
check (the exit code says whether it passed).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time

# (name, input side at 224 px, n = stream channels in, stride, blocks of this shape)
EQ3_SHAPES = [("stage1", 56, 64, 1, 3), ("stage2_block0", 56, 64, 2, 1),
              ("stage2", 28, 128, 1, 3), ("stage3_block0", 28, 128, 2, 1),
              ("stage3", 14, 256, 1, 5), ("stage4_block0", 14, 256, 2, 1),
              ("stage4", 7, 512, 1, 2)]
IMPLS = ("none", "xla", "pallas")


def eq3_n_out(n: int, stride: int) -> int:
  """The output width of an EQ3_SHAPES block: n, or 2n where the stage begins (stride)."""
  return n if stride == 1 else 2 * n


def pass_gbytes(batch, side, n, stride, e=4, itemsize=2) -> float:
  """GB the five passes of impl "pallas" must move for forward + backward at one shape
  (d_bn_product's table; partial sums and per-channel vectors left out): one pad of u,
  the padded u read by passes 1-4, nine hidden tensors (c, p; c, dp, dc; c, dp, dx; dx)
  and du written. Bytes / time is the bandwidth a pass structure reaches."""
  u, u_pad, hidden = _tensor_bytes(batch, side, n, stride, e, itemsize)
  return (2 * u + 5 * u_pad + 9 * hidden) / 1e9


def _tensor_bytes(batch, side, n, stride, e, itemsize):
  """Bytes of u, of u padded as the Pallas passes pad it, and of one hidden tensor."""
  from qlhs_jax.kernels.d_bn_product import _plan
  plan = _plan((batch, side, side, n), e, stride)
  return (batch * side * side * n * itemsize,
          batch * (side + 2) * (side + 1 + plan["pad_right"]) * n * itemsize,
          batch * plan["ho"] * plan["wo"] * n * e * itemsize)


def _inputs(key, batch, side, n, stride, e, dtype, n_out=None):
  """The operation's five inputs and the output's cotangent; with ``n_out``, C's weight
  (n, n*e) in c's place, A's (n*e, n_out) sixth, and the cotangent of y (n_out
  channels)."""
  import jax

  from qlhs_jax.models.layers import _out_size
  ho = _out_size(side, stride)
  ks = jax.random.split(key, 7)
  u = jax.random.normal(ks[0], (batch, side, side, n), dtype) + 0.2
  c = (jax.random.normal(ks[1], (batch, ho, ho, n * e), dtype) if n_out is None
       else jax.random.normal(ks[1], (n, n * e), dtype) / n ** 0.5)
  kernel = jax.random.normal(ks[2], (3, 3, 1, e)) * (2 / (9 * e)) ** 0.5
  scale = jax.random.uniform(ks[3], (n * e,), minval=0.5, maxval=1.5)
  bias = jax.random.normal(ks[4], (n * e,)) * 0.1
  if n_out is None:
    return (u, c, kernel, scale, bias), jax.random.normal(ks[5], c.shape, dtype)
  a = jax.random.normal(ks[6], (n * e, n_out), dtype) / (n * e) ** 0.5
  return (u, c, kernel, scale, bias, a), jax.random.normal(
      ks[5], (batch, ho, ho, n_out), dtype)


def _fwd_bwd(impl, stride, interpret, weights=False):
  """jit(args, dp) -> (p, gradients of <p, dp> w.r.t. the five inputs); ``weights``:
  jit(args, dy) -> (y, gradients of <y, dy> w.r.t. the six inputs of :func:`_inputs`
  with ``n_out``; y plus the shortcut u at stride 1), "none" differentiating the
  model's matmuls around the reference."""
  import jax
  from qlhs_jax.kernels import d_bn_product as dbn
  # At stride 1 the block's shortcut, u, is added to y (eq3_n_out: n_out = n there),
  # through the u the operation hands back where QLHS_DU_SUM=kernel has du's kernel add
  # its gradient.
  shortcut = stride == 1
  if impl == "none" and weights:
    def op(u, cw, kernel, scale, bias, a):
      p, mean, var = dbn.reference(u, dbn.c_of(u, cw, stride), kernel, scale, bias,
                                   stride=stride)
      y = dbn.a_of(p, a)
      return (y + u if shortcut else y), mean, var
  elif impl == "none":
    op = functools.partial(dbn.reference, stride=stride)
  elif weights:
    def op(u, cw, kernel, scale, bias, a):
      through = shortcut and dbn.du_sum() == "kernel"
      y, mean, var, *u_back = dbn.d_bn_product(
          u, cw, kernel, scale, bias, stride=stride, impl=impl, interpret=interpret,
          c_weights=True, a=a, through=through)
      if shortcut:
        y = y + (u_back[0] if through else u)
      return y, mean, var
  else:
    op = functools.partial(dbn.d_bn_product, stride=stride, impl=impl, interpret=interpret)

  def run(args, dp):
    p, vjp = jax.vjp(lambda *a: op(*a)[0], *args)
    return p, vjp(dp)
  return jax.jit(run)


def check(batch, size_scale, interpret, e=4, weights=False) -> list[dict]:
  """Relative error of "xla" and "pallas" (float32) against "none" in float64, per
  shape: the largest over p and the five gradients, each relative to its largest
  entry. ``weights``: given C's and A's weights (:func:`_fwd_bwd`), over y and the six
  gradients."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  out = []
  for name, side, n, stride, _ in EQ3_SHAPES:
    side = max(4, side // size_scale)
    n = max(1, n // size_scale)
    args, dp = _inputs(jax.random.PRNGKey(0), batch, side, n, stride, e, jnp.float32,
                       eq3_n_out(n, stride) if weights else None)
    with jax.enable_x64(True):
      ref = _fwd_bwd("none", stride, interpret, weights)(
          *jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), (args, dp)))
      ref = [np.asarray(r) for r in jax.tree.leaves(ref)]
    rec = {"shape": name}
    for impl in IMPLS[1:]:
      try:
        got = jax.tree.leaves(_fwd_bwd(impl, stride, interpret, weights)(args, dp))
      except Exception as ex:  # e.g. a kernel that does not compile on this device
        rec[impl], rec[f"{impl}_error"] = float("inf"), f"{type(ex).__name__}: {ex}"[:500]
        continue
      rec[impl] = max(float(np.abs(np.asarray(g, np.float64) - r).max()
                            / max(float(np.abs(r).max()), 1e-30))
                      for g, r in zip(got, ref))
    out.append(rec)
  return out


def timing(batch, size_scale, steps, warmup, interpret, impls=IMPLS, e=4) -> list[dict]:
  """Median ms of forward + backward, bfloat16, per shape and impl."""
  import jax
  import jax.numpy as jnp
  out = []
  for name, side, n, stride, count in EQ3_SHAPES:
    side = max(4, side // size_scale)
    args, dp = _inputs(jax.random.PRNGKey(1), batch, side, max(1, n // size_scale),
                       stride, e, jnp.bfloat16)
    rec = {"shape": name, "blocks": count, "ms": {},
           "pass_gbytes": pass_gbytes(batch, side, max(1, n // size_scale), stride, e)}
    for impl in impls:
      try:
        fn = _fwd_bwd(impl, stride, interpret).lower(args, dp).compile()
      except Exception as ex:  # reported by check(); the other impls are still timed
        rec["ms"][impl] = float("nan")
        rec.setdefault("errors", {})[impl] = f"{type(ex).__name__}: {ex}"[:500]
        continue
      rec["ms"][impl] = _median_ms(fn, (args, dp), steps, warmup)
    out.append(rec)
  return out


def _median_ms(fn, args, steps, warmup) -> float:
  import jax
  import numpy as np
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


PASSES = ("pad", "stats", "apply", "sums", "dx", "du", "du_ad")


def pass_gbytes_each(batch, side, n, stride, e=4, itemsize=2) -> dict:
  """GB each pass moves when it runs alone: "pad" (u in, padded u out), then the five
  passes of d_bn_product's table, each with its own pad of u (as each is timed alone),
  "du" the XLA pass (dx in, du out) in its "gather" form and "du_ad" in its "autodiff"
  form (QLHS_DU_FORM)."""
  u, u_pad, hidden = _tensor_bytes(batch, side, n, stride, e, itemsize)
  pad = u + u_pad
  return {k: v / 1e9 for k, v in dict(
      pad=pad, stats=pad + u_pad, apply=pad + u_pad + 2 * hidden,
      sums=pad + u_pad + 3 * hidden, dx=pad + u_pad + 3 * hidden, du=hidden + u,
      du_ad=hidden + u).items()}


def pass_timing(batch, size_scale, steps, warmup, interpret, e=4,
                verbose=False) -> list[dict]:
  """Median ms of each pass of "xla" and "pallas" run alone (bfloat16 tensors, float32
  per-channel vectors), per shape: which pass falls short of the bandwidth."""
  import jax
  import jax.numpy as jnp

  from qlhs_jax.benchmarks.step import kernel_env
  from qlhs_jax.kernels import d_bn_product as dbn
  F32 = jnp.float32
  out = []
  for name, side, n, stride, count in EQ3_SHAPES:
    side, n = max(4, side // size_scale), max(1, n // size_scale)
    (u, c, kernel, _, _), dp = _inputs(jax.random.PRNGKey(2), batch, side, n, stride, e,
                                       jnp.bfloat16)
    k9 = dbn._kernel9(kernel, n)
    c5, dp5 = c.reshape(c.shape[:3] + (n, e)), dp.reshape(c.shape[:3] + (n, e))
    keys = jax.random.split(jax.random.PRNGKey(3), 6)
    mul, add, mean, rstd, cx, c0 = (jax.random.uniform(k, (1, n, e), F32, 0.5, 1.5)
                                    for k in keys)
    dx = dp5
    plan = dbn._plan(u.shape, e, stride)

    def du(form):
      return lambda k9, dx: dbn._d_transpose(dx, k9, stride, (side, side), form).astype(
          u.dtype)
    calls = {  # pass: (xla function, pallas function, arguments)
        "pad": (lambda u: dbn._pad_u(u, plan), None, (u,)),
        "stats": (lambda u, k9: dbn._xla_stats(u, k9, stride, 1),
                  lambda u, k9: dbn._pallas_stats(u, k9, stride, 1, interpret), (u, k9)),
        "apply": (lambda *a: dbn._xla_apply(*a, stride, 1),
                  lambda *a: dbn._pallas_apply(*a, stride, 1, interpret),
                  (u, c5, k9, mul, add)),
        "sums": (lambda *a: dbn._xla_backward_sums(*a, stride, 1),
                 lambda *a: dbn._pallas_backward_sums(*a, stride, 1, interpret),
                 (u, c5, dp5, k9, mul, add, mean, rstd)),
        "dx": (lambda *a: dbn._xla_backward_dx(*a, stride, 1, dp.dtype),
               lambda *a: dbn._pallas_backward_dx(*a, stride, 1, dp.dtype, interpret),
               (u, c5, dp5, k9, mul, cx, c0, mean)),
        "du": (du("gather"), None, (k9, dx)),
        "du_ad": (du("autodiff"), None, (k9, dx)),
    }
    gbytes = pass_gbytes_each(batch, side, n, stride, e)
    for p in PASSES:
      xla_fn, pallas_fn, args = calls[p]
      rec = {"shape": name, "blocks": count, "pass": p, "gbytes": gbytes[p], "ms": {}}
      for impl, fn in (("xla", xla_fn), ("pallas", pallas_fn)):
        if fn is None:  # an XLA pass in both: timed once
          rec["ms"][impl] = rec["ms"]["xla"]
          continue
        try:
          # XLA's own passes: QLHS_SUMS_FORM left unset is "auto", which on a GPU would
          # time the stencil kernel as the "xla" sums.
          with kernel_env("QLHS_SUMS_FORM", "xla"):
            compiled = jax.jit(fn).lower(*args).compile()
          rec["ms"][impl] = _median_ms(compiled, args, steps, warmup)
        except Exception as ex:  # reported; the other passes are still timed
          rec["ms"][impl] = float("nan")
          rec.setdefault("errors", {})[impl] = f"{type(ex).__name__}: {ex}"[:500]
      out.append(rec)
      if verbose:  # as it goes: a run cut short by its time limit still shows these
        print(pass_row(rec), flush=True)
  return out


PASS_HEADER = (f"  {'shape':14s} {'pass':6s} {'xla':>8s} {'pallas':>8s} {'GB':>7s} "
               f"{'GB/s':>7s}")


def pass_row(r: dict) -> str:
  """One shape and pass: ms of "xla" and "pallas" alone, the pass's hand-counted GB and
  the bandwidth "pallas" reaches on it (failures named below)."""
  ms = r["ms"]["pallas"]
  line = (f"  {r['shape']:14s} {r['pass']:6s} {r['ms']['xla']:8.3f} {ms:8.3f} "
          f"{r['gbytes']:7.3f} {r['gbytes'] / (ms / 1e3):7.0f}")
  return "\n".join([line] + [f"    {i} failed: {err}"
                             for i, err in r.get("errors", {}).items()])


def pass_totals(passes: list[dict]) -> str:
  """The network sum per pass (x blocks) for "xla" and "pallas"."""
  total = {}
  for r in passes:
    for i in ("xla", "pallas"):
      total[(r["pass"], i)] = total.get((r["pass"], i), 0.0) + r["blocks"] * r["ms"][i]
  return "\n".join(f"  {'network (sum)':14s} {p:6s} {total[(p, 'xla')]:8.3f} "
                   f"{total[(p, 'pallas')]:8.3f}" for p in PASSES)


def best_tiling(path: str) -> str | None:
  """The Pallas tiling ("rows,elems,warps,cols,stages") of the fused_op record in
  ``path`` with the smallest network time for "pallas" (records without one skipped),
  or None. Compares records of one device only: the newest record's."""
  recs = []
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      if r.get("kind") == "fused_op" and "tiling_values" in r:
        recs.append(r)
  if not recs:
    return None
  device = recs[-1]["device"]
  def pallas_ms(r):  # None where "pallas" was not timed or failed (NaN)
    ms = r["network_ms"].get("pallas")
    return ms if ms is not None and ms == ms else None
  timed = [r for r in recs if r["device"] == device and pallas_ms(r) is not None]
  if not timed:
    return None
  best = min(timed, key=pallas_ms)
  return ",".join(map(str, best["tiling_values"]))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--check-batch", type=int, default=8)
  p.add_argument("--size-scale", type=int, default=1,
                 help="divide sides and channel counts by this (CPU smoke runs)")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--interpret", action="store_true",
                 help="run the Pallas kernels in interpret mode (any backend, slow)")
  p.add_argument("--impls", default=",".join(IMPLS),
                 help="comma-separated implementations to time (the check runs all)")
  p.add_argument("--passes", action="store_true",
                 help="also time each pass alone (pad, stats, apply, sums, dx, du, du_ad)")
  p.add_argument("--record", default=None, help="append a record to this JSON-lines file")
  p.add_argument("--weights", action="store_true",
                 help="check the operation given C's and A's weights, and the "
                      "block's shortcut at stride 1 (c, dp and the weight gradients "
                      "made, and u's shares summed, where QLHS_C_FORM, QLHS_DP_FORM, "
                      "QLHS_WEIGHT_GRADS and QLHS_DU_SUM say)")
  p.add_argument("--check-only", action="store_true",
                 help="stop after the check (exit 1 where it fails)")
  p.add_argument("--best-of", default=None, metavar="FILE",
                 help="only print the fastest Pallas tiling recorded in FILE and exit")
  args = p.parse_args(argv)
  from qlhs_jax import xla_options
  xla_options.request_from_env()  # before JAX starts, as the step harness does
  if args.best_of:
    best = best_tiling(args.best_of)
    print(best or "")
    return 0 if best else 1
  impls = tuple(i for i in IMPLS if i in args.impls.split(","))
  if not impls or set(args.impls.split(",")) - set(IMPLS):
    p.error(f"--impls {args.impls!r}: choose from {','.join(IMPLS)}")
  import jax
  from qlhs_jax.kernels.d_bn_product import tiling
  if jax.default_backend() == "cpu" and not args.interpret:
    print("CPU backend: the Pallas kernels run in interpret mode (slow; use --size-scale)")
    args.interpret = True

  checks = check(args.check_batch, args.size_scale, args.interpret,
                 weights=args.weights)
  ok = all(r[i] < 1e-4 for r in checks for i in IMPLS[1:])
  print("agreement with autodiff of the reference in float64 (max relative error, "
        f"float32, batch {args.check_batch}"
        + (", given C's and A's weights" if args.weights else "") + "):")
  for r in checks:
    print(f"  {r['shape']:14s} " + "  ".join(f"{i} {r[i]:.1e}" for i in IMPLS[1:]))
    for i in IMPLS[1:]:
      if f"{i}_error" in r:
        print(f"    {i} failed: {r[f'{i}_error']}")
  if not ok:
    print("MISMATCH: an implementation disagrees with the reference", file=sys.stderr)
  if args.check_only:
    return 0 if ok else 1
  times = timing(args.batch, args.size_scale, args.steps, args.warmup, args.interpret,
                 impls)
  dev = jax.devices()[0]
  print(f"forward + backward, ms (batch {args.batch}, bfloat16, {dev.device_kind}); "
        "GB/s = the Pallas passes' bytes (pass_gbytes) / pallas ms:")
  print(f"  {'shape':14s} {'blocks':>6s} " + " ".join(f"{i:>9s}" for i in impls)
        + f" {'GB':>7s} {'GB/s':>7s}")
  total = {i: 0.0 for i in impls}
  for r in times:
    gbps = r["pass_gbytes"] / (r["ms"].get("pallas", float("nan")) / 1e3)
    print(f"  {r['shape']:14s} {r['blocks']:6d} "
          + " ".join(f"{r['ms'][i]:9.3f}" for i in impls)
          + f" {r['pass_gbytes']:7.3f} {gbps:7.0f}")
    for i in impls:
      total[i] += r["blocks"] * r["ms"][i]
  print(f"  {'network (sum)':14s} {'16':>6s} " + " ".join(f"{total[i]:9.3f}" for i in impls))
  passes = None
  if args.passes:
    print("each pass alone, ms (pad, du and du_ad are XLA in both; each pass includes its "
          "own pad of u; du_ad = du in QLHS_DU_FORM=autodiff); GB/s = GB / pallas ms:")
    print(PASS_HEADER, flush=True)
    passes = pass_timing(args.batch, args.size_scale, args.steps, args.warmup,
                         args.interpret, verbose=True)
    print(pass_totals(passes))
  if args.record:
    os.makedirs(os.path.dirname(os.path.abspath(args.record)), exist_ok=True)
    with open(args.record, "a") as f:
      f.write(json.dumps({
          "kind": "fused_op", "batch": args.batch, "size_scale": args.size_scale,
          "dtype": "bfloat16", "device": f"{dev.platform}:{dev.device_kind}",
          "jax": jax.__version__, "date": datetime.date.today().isoformat(),
          "interpret": args.interpret, "tiling": os.environ.get("QLHS_PALLAS_TILING", ""),
          "tiling_values": list(tiling()),
          "agreement": checks, "shapes": times, "network_ms": total,
          **({"passes": passes} if passes else {})}) + "\n")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
