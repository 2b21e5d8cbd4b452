"""The Pallas kernels' loop trips of an older commit's train step, with today's reader.

  python benchmarks/loops_at_commit.py 6e0def0 OUT.json [--model eq3_softball_ds]
      [--set fuse_d_bn=auto] [--input uint8]

``benchmarks.aot --hlo-dir`` writes a step's ``.pallas_loops.json`` (each Pallas call's
trip counts, which ``xla_floors --loops`` and ``budget --floors`` need: the machine code
shows a loop's body, not how often it runs) since 2026-12-07. For a step profiled
before, this makes a git worktree of COMMIT in a temporary folder, traces that commit's
train step with its own ``qlhs_jax`` (models, harness, ``aot``'s abstract inputs, the
Pallas kernels lowered for the GPU) and reads the trace with today's
``xla_floors.pallas_loops``. Tracing only: nothing compiles, a few seconds. Run it with
a JAX whose CUDA plugin is installed (as for ``aot``): the kernels' forms resolve as on
the GPU. Used for the H200's profiled step of 6e0def0 (NOTES.md, experiment 52).
"""

import argparse
import ast
import json
import os
import sys

from aot_at_commit import today_modules, worktree  # this folder's: run as a script


def loops_at(tree: str, model_name: str, overrides: dict, input: str,
             reader) -> list[dict]:
  sys.path.insert(0, tree)
  import qlhs_jax
  if not os.path.abspath(qlhs_jax.__file__).startswith(os.path.abspath(tree)):
    raise SystemExit(f"imported {qlhs_jax.__file__}, not the worktree's qlhs_jax")
  from qlhs_jax.benchmarks import aot  # the worktree's: its device, inputs, settings
  device_list = aot.compile_only_devices("h100", 1)
  import jax
  import jax.numpy as jnp

  from qlhs_jax import steps as S
  from qlhs_jax.benchmarks.step import harness_train_step
  from qlhs_jax.models import create
  model = create(model_name, dtype=jnp.bfloat16, bn_groups=1, **overrides)
  mesh = S.make_mesh(device_list)
  tx, step = harness_train_step(model, mesh, input)
  with aot.pallas_for_gpu(), jax.set_mesh(mesh):
    traced = step.trace(*aot.abstract_step_inputs(model, tx, mesh, 256, 224, input))
  return reader.pallas_loops(traced.jaxpr)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("commit")
  p.add_argument("out", help="the JSON file to write")
  p.add_argument("--model", default="eq3_softball_ds")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a model field, as benchmarks.aot's --set")
  p.add_argument("--input", default="uint8", choices=["float32", "uint8"])
  args = p.parse_args(argv)
  overrides = {}
  for kv in args.set:
    key, _, value = kv.partition("=")
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  (reader,) = today_modules("xla_floors")  # today's, before the worktree's package
  with worktree(args.commit) as tree:
    loops = loops_at(tree, args.model, overrides, args.input, reader)
  with open(args.out, "w") as f:
    json.dump(loops, f, indent=0)
  print(f"{args.out}: {len(loops)} Pallas calls of {args.model} at {args.commit}")


if __name__ == "__main__":
  main()
