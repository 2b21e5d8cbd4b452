"""How far do the fused paths drift from the plain one over many train steps?

  python benchmarks/train_drift.py [--steps 60] [--fuse xla block]

Runs the harness's train step (qlhs_jax.steps: SGD-Nesterov, weight decay, label
smoothing, running statistics) at the CPU quickstart's widths, in float32, from the same
initial variables, for the plain path (fuse_d_bn="none") and each fused path, each step
on a different random batch of a learnable task (labels from fixed random projections of
the image). Prints, at a few steps, the largest relative parameter difference of each
fused path from the plain one and between the fused paths. Rounding (float32 summation
order) makes them drift; a wrong gradient would make one drift faster and keep growing.
On a CPU the Pallas kernels of "block" run interpreted (~3 minutes for 60 steps on 2
cores). benchmarks/NOTES.md, experiment 8, has the figures.
"""

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from qlhs_jax import steps as S
from qlhs_jax.models import QLHSNet

REPORT_AT = (1, 5, 10, 20, 30, 40, 60, 80, 100)


def batches(steps: int, batch: int = 64, size: int = 32, classes: int = 5, seed: int = 0):
  rng = np.random.default_rng(seed)
  proj = rng.normal(size=(size * size * 3, classes))
  for _ in range(steps):
    x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    yield {"image": jnp.asarray(x),
           "label": jnp.asarray((x.reshape(batch, -1) @ proj).argmax(1))}


def trajectories(fuses, steps: int) -> dict:
  """``{fuse: [params after step 1, 2, ...]}`` from the same initial variables."""
  data = list(batches(steps))
  plain = QLHSNet(widths=(16, 32, 64, 128), depths=(1, 1, 1, 1), stem="small",
                  num_classes=5, dtype=jnp.float32)
  tx = S.make_optimizer()
  lr_fn = lambda epoch: S.timm_cosine_lr(epoch, base_lr=0.3, epochs=50, warmup_epochs=0)
  # One initial state for all: every fuse_d_bn has the plain path's variables.
  start = S.create_train_state(plain, tx, jax.random.PRNGKey(0), data[0]["image"].shape[1:])
  out = {}
  for fuse in fuses:
    state = start
    step = jax.jit(S.make_train_step(plain.clone(fuse_d_bn=fuse), tx, lr_fn, num_classes=5))
    out[fuse] = []
    for b in data:
      state, _ = step(state, b)
      out[fuse].append(state.params)
  return out


def rel_diff(a, b) -> float:
  """Largest over the parameter arrays of max|a - b| / max|b|."""
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30)), a, b)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--fuse", nargs="+", default=["xla", "block"])
  args = p.parse_args(argv)
  traj = trajectories(["none"] + args.fuse, args.steps)
  pairs = [(f, "none") for f in args.fuse] + list(itertools.combinations(args.fuse, 2))
  print("step  " + "  ".join(f"{a} vs {b}" for a, b in pairs))
  for n in REPORT_AT:
    if n <= args.steps:
      print(f"{n:4d}  " + "  ".join(
          f"{rel_diff(traj[a][n - 1], traj[b][n - 1]):.2e}".rjust(len(a) + len(b) + 4)
          for a, b in pairs))


if __name__ == "__main__":
  main()
