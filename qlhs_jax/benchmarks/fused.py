"""The operation ``BN(D u) * c`` alone, per implementation: agreement, then time.

  python -m qlhs_jax.benchmarks.fused [--batch 256] [--steps 20] [--record FILE]

For each hidden-tensor shape of Eq.(3) (ws, x4) at 224 px (stage 1, the stride-2 first
blocks, stages 2-4), runs forward + backward of ``qlhs_jax.kernels.d_bn_product`` with
``impl`` "none" (autodiff of ``reference``: what the model does with fuse_d_bn="none"),
"xla" and "pallas". First it checks, in float32 at ``--check-batch``, that "xla" and
"pallas" give the reference's outputs and gradients (relative error < 1e-4; exit code 1
otherwise, also when one fails to compile: the others are still checked and timed). Then it times each in bfloat16 at ``--batch`` (median of ``--steps``) and
sums the per-block times over the network's 16 blocks: the part of a train step that
fusing changes. On a CPU the Pallas kernels run in interpret mode (implied there; use a
``--size-scale`` of 8 or so; CPU times are meaningful only as ratios within one run).
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


def pass_gbytes(batch, side, n, stride, e=4, itemsize=2) -> float:
  """GB the five passes of impl "pallas" must move for forward + backward at one shape
  (d_bn_product's table; partial sums and per-channel vectors left out): one pad of u,
  the padded u read by passes 1-4, nine hidden tensors (c, p; c, dp, dc; c, dp, dx; dx)
  and du written. Bytes / time is the bandwidth a pass structure reaches."""
  from qlhs_jax.kernels.d_bn_product import _plan
  plan = _plan((batch, side, side, n), e, stride)
  u = batch * side * side * n * itemsize
  u_pad = batch * (side + 2) * (side + 1 + plan["pad_right"]) * n * itemsize
  hidden = batch * plan["ho"] * plan["wo"] * n * e * itemsize
  return (2 * u + 5 * u_pad + 9 * hidden) / 1e9


def _inputs(key, batch, side, n, stride, e, dtype):
  import jax
  import jax.numpy as jnp
  ho = (side - 1) // stride + 1
  ks = jax.random.split(key, 6)
  u = jax.random.normal(ks[0], (batch, side, side, n), dtype) + 0.2
  c = jax.random.normal(ks[1], (batch, ho, ho, n * e), dtype)
  kernel = jax.random.normal(ks[2], (3, 3, 1, e)) * (2 / (9 * e)) ** 0.5
  scale = jax.random.uniform(ks[3], (n * e,), minval=0.5, maxval=1.5)
  bias = jax.random.normal(ks[4], (n * e,)) * 0.1
  dp = jax.random.normal(ks[5], c.shape, dtype)
  return (u, c, kernel, scale, bias), dp


def _fwd_bwd(impl, stride, interpret):
  """jit(args, dp) -> (p, gradients of <p, dp> w.r.t. the five inputs)."""
  import jax
  from qlhs_jax.kernels import d_bn_product as dbn
  if impl == "none":
    op = functools.partial(dbn.reference, stride=stride)
  else:
    op = functools.partial(dbn.d_bn_product, stride=stride, impl=impl, interpret=interpret)

  def run(args, dp):
    p, vjp = jax.vjp(lambda *a: op(*a)[0], *args)
    return p, vjp(dp)
  return jax.jit(run)


def check(batch, size_scale, interpret, e=4) -> list[dict]:
  """Relative error of "xla" and "pallas" (float32) against "none" in float64, per
  shape: the largest over p and the five gradients, each relative to its largest
  entry."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  out = []
  for name, side, n, stride, _ in EQ3_SHAPES:
    side = max(4, side // size_scale)
    args, dp = _inputs(jax.random.PRNGKey(0), batch, side, max(1, n // size_scale),
                       stride, e, jnp.float32)
    with jax.enable_x64(True):
      ref = _fwd_bwd("none", stride, interpret)(
          *jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), (args, dp)))
      ref = [np.asarray(r) for r in jax.tree.leaves(ref)]
    rec = {"shape": name}
    for impl in IMPLS[1:]:
      try:
        got = jax.tree.leaves(_fwd_bwd(impl, stride, interpret)(args, dp))
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
  import numpy as np
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
      for _ in range(warmup):
        jax.block_until_ready(fn(args, dp))
      times = []
      for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(args, dp))
        times.append(time.perf_counter() - t0)
      rec["ms"][impl] = 1e3 * float(np.median(times))
    out.append(rec)
  return out


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
  p.add_argument("--record", default=None, help="append a record to this JSON-lines file")
  args = p.parse_args(argv)
  import jax
  if jax.default_backend() == "cpu" and not args.interpret:
    print("CPU backend: the Pallas kernels run in interpret mode (slow; use --size-scale)")
    args.interpret = True

  checks = check(args.check_batch, args.size_scale, args.interpret)
  ok = all(r[i] < 1e-4 for r in checks for i in IMPLS[1:])
  print("agreement with autodiff of the reference in float64 (max relative error, "
        f"float32, batch {args.check_batch}):")
  for r in checks:
    print(f"  {r['shape']:14s} " + "  ".join(f"{i} {r[i]:.1e}" for i in IMPLS[1:]))
    for i in IMPLS[1:]:
      if f"{i}_error" in r:
        print(f"    {i} failed: {r[f'{i}_error']}")
  if not ok:
    print("MISMATCH: an implementation disagrees with the reference", file=sys.stderr)
  times = timing(args.batch, args.size_scale, args.steps, args.warmup, args.interpret)
  dev = jax.devices()[0]
  print(f"forward + backward, ms (batch {args.batch}, bfloat16, {dev.device_kind}); "
        "GB/s = the Pallas passes' bytes (pass_gbytes) / pallas ms:")
  print(f"  {'shape':14s} {'blocks':>6s} " + " ".join(f"{i:>9s}" for i in IMPLS)
        + f" {'GB':>7s} {'GB/s':>7s}")
  total = {i: 0.0 for i in IMPLS}
  for r in times:
    gbps = r["pass_gbytes"] / (r["ms"]["pallas"] / 1e3)
    print(f"  {r['shape']:14s} {r['blocks']:6d} "
          + " ".join(f"{r['ms'][i]:9.3f}" for i in IMPLS)
          + f" {r['pass_gbytes']:7.3f} {gbps:7.0f}")
    for i in IMPLS:
      total[i] += r["blocks"] * r["ms"][i]
  print(f"  {'network (sum)':14s} {'16':>6s} " + " ".join(f"{total[i]:9.3f}" for i in IMPLS))
  if args.record:
    os.makedirs(os.path.dirname(os.path.abspath(args.record)), exist_ok=True)
    with open(args.record, "a") as f:
      f.write(json.dumps({
          "kind": "fused_op", "batch": args.batch, "size_scale": args.size_scale,
          "dtype": "bfloat16", "device": f"{dev.platform}:{dev.device_kind}",
          "jax": jax.__version__, "date": datetime.date.today().isoformat(),
          "interpret": args.interpret, "tiling": os.environ.get("QLHS_PALLAS_TILING", ""),
          "agreement": checks, "shapes": times, "network_ms": total}) + "\n")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
