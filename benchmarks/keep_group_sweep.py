"""How many leaves should one select of `steps.keep_where` take? Compiled for an H100, no GPU.

  python benchmarks/keep_group_sweep.py [--model eq3_softball_ds] [--groups 2,3,4,5,6,8]

Compiles the train step of `qlhs_jax.benchmarks.aot` (uint8 batches; Eq.(3) with
fuse_d_bn="auto") once per value of `steps.KEEP_GROUP_LEAVES`, the most leaves of one
dtype and size that share a select, and prints the step's kernels and GB: the per-leaf
step first (config.group_state_writes=False), then each group size, then "all" (no
limit), then the default group size with the state donated, which the grouped step
avoids (benchmarks/NOTES.md, experiment 33). About a minute a compile on 2 cores.

Run with the GPU machine's JAX (0.11.2, `pip install "jax[cuda12]==0.11.2"`).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qlhs_jax import steps  # noqa: E402
from qlhs_jax.benchmarks import aot, hlo_bytes  # noqa: E402


def compile_step(model, overrides, writes, group=None, donate=None):
  """(kernels, GB) of the step with ``KEEP_GROUP_LEAVES = group``; ``donate`` forces
  the state's donation either way."""
  default_group, make = steps.KEEP_GROUP_LEAVES, steps.make_train_step

  def make_with(*a, **k):
    step = make(*a, **k)
    if donate is not None:
      step.donate_state = donate
    return step
  steps.KEEP_GROUP_LEAVES = default_group if group is None else group
  steps.make_train_step = make_with
  try:
    compiled = aot.compile_train_step(model, overrides, input="uint8",
                                      state_writes=writes)[0]
  finally:
    steps.KEEP_GROUP_LEAVES, steps.make_train_step = default_group, make
  rows = hlo_bytes.analyse(compiled.as_text())
  return len(rows), sum(r[0] for r in rows) / 1e9


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="eq3_softball_ds")
  p.add_argument("--groups", default="2,3,4,5,6,8,10,12,16")
  args = p.parse_args()
  overrides = {} if args.model.startswith(("resnet", "mobilenet")) else {
      "fuse_d_bn": "auto"}
  default = steps.KEEP_GROUP_LEAVES
  runs = [("per leaf, donated", "per_leaf", None, None)]
  runs += [(f"groups of at most {g}", "grouped", int(g), None)
           for g in args.groups.split(",")]
  runs += [("one group per dtype and size", "grouped", 10**9, None),
           (f"groups of at most {default}, donated", "grouped", default, True)]
  print(f"{args.model}, train step compiled for an H100 (batch 256, 224 px, uint8 input)")
  for name, writes, group, donate in runs:
    kernels, gb = compile_step(args.model, overrides, writes, group, donate)
    print(f"  {name:36s} {kernels:5d} kernels {gb:7.2f} GB", flush=True)


if __name__ == "__main__":
  main()
