"""Compile the train step of an older commit for an H100 on a CPU, with today's tools.

  python benchmarks/aot_at_commit.py 50d2d9d eq3_softball_ds resnet50 [--gemm triton]

A GPU measurement belongs to the commit it ran at. To calibrate the deviceless compile
(`qlhs_jax.benchmarks.aot`) against it, compile that commit's models, not today's: this
makes a git worktree of COMMIT in a temporary folder, imports its `qlhs_jax` (models,
steps), builds the harness's train step (the recipe's optimizer and schedule, 100
classes, batch 256, 224 px, bfloat16) and compiles it for the H100 with today's `aot`
target and `--gemm` options, counting bytes with today's `hlo_bytes` (older ones
dropped operands past the fifth).

Run with the GPU machine's JAX (0.11.2, Python 3.12, `pip install "jax[cuda12]==0.11.2"`).
Calibration, 2026-11-27 (benchmarks/NOTES.md, experiment 6): the H100 run's code was
committed as b94c9c1; the HLO it dumped is in benchmarks/device_hlo/ (`python -m
qlhs_jax.benchmarks.hlo_bytes benchmarks/device_hlo/h100_b94c9c1_eq3_softball_ds...`:
eq3_softball_ds 103.7 GB in 1012 kernels, resnet50 102.6 GB in 1085; the H200's, commit
50d2d9d, the same bytes). This script gives, for either commit,
"triton" 103.7 GB / 1009 kernels and 102.1 GB / 1073; "cublas" 97.3 and 100.0 GB.
"""

import argparse
import contextlib
import importlib
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def today_modules(*names):
  """Today's ``qlhs_jax.benchmarks`` modules ``names`` from this checkout, imported with
  today's package under them; then today's package leaves ``sys.modules``, so that the
  worktree's ``qlhs_jax`` imports fresh (the modules keep what they bound). Call it
  before the worktree goes on ``sys.path``. Loaded by file path alone, as until
  2026-12-07, a module's own imports of the package (``aot``'s and ``step``'s
  ``xla_options``, ``xla_floors``' ``warp_cycles``) put today's package in place of
  the worktree's, or came from a worktree that lacks them."""
  package = lambda k: k == "qlhs_jax" or k.startswith("qlhs_jax.")
  if any(map(package, sys.modules)):
    raise RuntimeError("qlhs_jax is imported already: call today_modules first")
  sys.path.insert(0, REPO)
  try:
    return [importlib.import_module(f"qlhs_jax.benchmarks.{n}") for n in names]
  finally:
    sys.path.remove(REPO)
    for k in [k for k in sys.modules if package(k)]:
      del sys.modules[k]


@contextlib.contextmanager
def worktree(commit: str):
  """A git worktree of ``commit`` in a temporary folder, its path; removed after."""
  with tempfile.TemporaryDirectory() as d:
    tree = os.path.join(d, commit)
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", "-q", tree, commit],
                   check=True)
    try:
      yield tree
    finally:
      subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", tree],
                     check=True)


def compile_at(tree: str, model_name: str, gemm: str, aot, hlo_bytes, step) -> str:
  device = aot.compile_only_device("h100")
  sys.path.insert(0, tree)
  import jax
  import jax.numpy as jnp

  import qlhs_jax
  if not os.path.abspath(qlhs_jax.__file__).startswith(os.path.abspath(tree)):
    raise SystemExit(f"imported {qlhs_jax.__file__}, not the worktree's qlhs_jax")
  from qlhs_jax.models import create
  mesh = aot.single_device_mesh(device)
  model = create(model_name, dtype=jnp.bfloat16, bn_groups=1)
  # Today's harness_train_step imports qlhs_jax.steps when called: the worktree's.
  tx, train_step = step.harness_train_step(model, mesh)
  state, data = aot.abstract_step_inputs(model, tx, mesh, 256, 224)
  text = train_step.lower(state, data).compile(aot.GEMM_OPTIONS[gemm]).as_text()
  rows = hlo_bytes.analyse(text)
  return (f"{model_name:24s} {sum(r[0] for r in rows) / 1e9:8.2f} GB {len(rows):6d} kernels"
          f"  (commit {os.path.basename(tree)}, --gemm {gemm}, jax {jax.__version__})")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("commit")
  p.add_argument("models", nargs="+")
  p.add_argument("--gemm", default="triton", choices=["triton", "cublas"])
  args = p.parse_args(argv)
  aot, hlo_bytes, step = today_modules("aot", "hlo_bytes", "step")
  with worktree(args.commit) as tree:
    for m in args.models:  # one process: the worktree's modules stay imported
      print(compile_at(tree, m, args.gemm, aot, hlo_bytes, step), flush=True)


if __name__ == "__main__":
  main()
