"""Are ``fuse_d_bn="block"``'s kernels right on this device? Agreement with float64.

  python -m qlhs_jax.benchmarks.block_check [--batch 4]

For a stage-1, a strided stage-2 and a stage-4 shape of Eq.(3) (224 px, at a small
batch), runs ``eq3_block.eq3_hidden`` forward and backward on the default device in
bfloat16, with the Triton kernels (interpreted where the device is a CPU), and the plain
formula (``eq3_block.reference``, XLA) in bfloat16 on the same device; both are compared
with the plain formula in float64 on the CPU. Every output and gradient of the kernels
must be as close to float64 as the plain path's, within 1.5x, or within 1e-2 relative
(the CPU tests' criterion, tests/kernels/test_eq3_block.py). Prints one line per shape
and quantity; exit status 1 if any fails. ``benchmarks/gpu_h100.sh step`` runs it
before timing "block", so that a wrong kernel is not timed as a fast one.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from qlhs_jax.kernels import eq3_block
from qlhs_jax.models.common import BN_EPS
from qlhs_jax.models.layers import _out_size

# (name, side, n, n_out, stride): Eq.(3) ws x4 at 224 px.
SHAPES = [("stage1", 56, 64, 64, 1), ("stage2_block0", 56, 64, 128, 2),
          ("stage4", 7, 512, 512, 1)]
NAMES = ("y", "mean", "var", "du", "dC", "dA", "dkernel", "dscale", "dbias")


def inputs(seed: int, batch: int, side: int, n: int, n_out: int, stride: int, e: int = 4):
  """float64 (u, C, A, kernel, scale, bias) and the loss weights of the three outputs."""
  rng = np.random.default_rng(seed)
  so = _out_size(side, stride)
  args = (rng.normal(size=(batch, side, side, n)) + 0.3,
          rng.normal(size=(n, n * e)) / np.sqrt(n),
          rng.normal(size=(n * e, n_out)) / np.sqrt(n * e),
          rng.normal(size=(3, 3, 1, e)), rng.uniform(0.5, 1.5, n * e),
          rng.normal(size=n * e))
  weights = (rng.normal(size=(batch, so, so, n_out)), rng.normal(size=(1, n * e)),
             rng.normal(size=(1, n * e)))
  return args, weights


def outputs_and_grads(fn, args, weights):
  """``fn``'s three outputs and the gradients of a loss reading all of them."""
  def loss(*a):
    y, mean, var = fn(*a)
    w1, w2, w3 = weights
    return ((y * w1).sum() + (mean * w2).sum() + (var * w3).sum()).astype(jnp.float32)
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(
      (fn(*args), jax.grad(loss, argnums=range(6))(*args)))]


def check_shape(batch: int, side: int, n: int, n_out: int, stride: int, seed: int = 0):
  """``[(quantity, kernels' error, plain path's error, ok)]``, errors relative to the
  float64 values' largest magnitude."""
  args, weights = inputs(seed, batch, side, n, n_out, stride)
  cpu = jax.devices("cpu")[0]
  with jax.enable_x64(True), jax.default_device(cpu):
    exact = outputs_and_grads(
        functools.partial(eq3_block.reference, stride=stride, eps=BN_EPS),
        [jnp.asarray(a) for a in args], [jnp.asarray(w) for w in weights])
  dtypes = (jnp.bfloat16,) * 3 + (jnp.float32,) * 3
  a16 = [jnp.asarray(a, d) for a, d in zip(args, dtypes)]
  w32 = [jnp.asarray(w, jnp.float32) for w in weights]
  interpret = jax.default_backend() == "cpu"
  got = {
      "kernels": outputs_and_grads(functools.partial(
          eq3_block.eq3_hidden, stride=stride, eps=BN_EPS, interpret=interpret), a16, w32),
      "plain": outputs_and_grads(functools.partial(
          eq3_block.reference, stride=stride, eps=BN_EPS), a16, w32)}
  rows = []
  for i, name in enumerate(NAMES):
    scale = np.abs(exact[i]).max()
    ek, ep = (np.abs(got[k][i] - exact[i]).max() / scale for k in ("kernels", "plain"))
    rows.append((name, ek, ep, bool(np.isfinite(ek) and ek <= max(1.5 * ep, 1e-2))))
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--shapes", default="", help="comma-separated names (default all)")
  args = p.parse_args(argv)
  from qlhs_jax import xla_options
  xla_options.request_from_env()  # before JAX starts, as the step harness does
  wanted = set(filter(None, args.shapes.split(",")))
  dev = jax.devices()[0]
  print(f"eq3_block kernels on {dev.platform}:{dev.device_kind}, jax {jax.__version__}, "
        f"batch {args.batch}, bfloat16, QLHS_BLOCK_TILING="
        f"{os.environ.get('QLHS_BLOCK_TILING', '')!r}; relative error against float64 "
        f"(kernels | plain path)")
  ok = True
  for name, side, n, n_out, stride in SHAPES:
    if wanted and name not in wanted:
      continue
    for q, ek, ep, good in check_shape(args.batch, side, n, n_out, stride):
      ok &= good
      print(f"  {name:14s} {q:8s} {ek:9.2e} | {ep:9.2e}  {'ok' if good else 'WRONG'}")
  print("all agree" if ok else "DISAGREEMENT: do not trust fuse_d_bn='block' timings")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
