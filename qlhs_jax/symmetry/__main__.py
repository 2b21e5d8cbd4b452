"""Symmetry commands on a training run (a workdir with orbax checkpoints).

  python -m qlhs_jax.symmetry check --workdir RUN [--n 64]
  python -m qlhs_jax.symmetry sparsify --workdir RUN [--steps 1000]
  python -m qlhs_jax.symmetry weak --workdir RUN

``check`` prints the declared group and the largest relative logit deviation over
``n`` sampled elements on validation images, in float32 and float64, and a negative
control (generic invertible matrices in every slot). ``sparsify`` searches the
continuous part of the group for a sparser basis, verifies that the logits still match,
then magnitude-prunes the 1x1 weights of the original and of the transformed model and
writes a table (``sparsify.md``, ``sparsify.json``) and a plot (``sparsify.png``) of
validation top-1 against the fraction of 1x1 weights kept. ``weak`` searches for weak
(data) symmetries where the block form forbids mixing (symmetry.md 3; ``weak.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from qlhs_jax.models.fold import apply_folded
from qlhs_jax.symmetry import sparsify as sp
from qlhs_jax.symmetry import weak as weak_lib
from qlhs_jax.symmetry.action import act
from qlhs_jax.symmetry.groups import group_for
from qlhs_jax.symmetry.measure import check, prepare

DEFAULT_FRACTIONS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05)


def validation_images(config, n: int, offset: int = 0) -> np.ndarray:
  """``n`` validation images (the eval pipeline: no augmentation), from ``offset``."""
  from qlhs_jax import data as data_lib
  inp = data_lib.build_input(config.data, split="validation",
                             global_batch_size=config.eval_batch_size, seed=config.seed)
  images = []
  for batch in inp.iterator():
    images.append(batch["image"][batch["mask"].astype(bool)])
    if sum(len(i) for i in images) >= n + offset:
      break
  return np.concatenate(images)[offset:offset + n]


def _load(args):
  from qlhs_jax import checkpoint as ckpt_lib
  run = ckpt_lib.load_run(args.workdir, args.which)
  print(f"run {args.workdir}: model {run.config.model}, step {run.step}")
  return run, run.variables


def cmd_check(args) -> dict:
  run, variables = _load(args)
  group = group_for(run.model)
  print(group.describe())
  x = validation_images(run.config, args.images)
  kw = dict(x=x, batch_size=args.batch_size)
  t0 = time.time()
  result = {
      "model": run.config.model, "step": run.step, "elements": args.n,
      "images": int(len(x)), "group_dimension": group.dimension,
      "float64": check(run.model, variables, args.seed, args.n, float64=True, **kw),
      "float32": check(run.model, variables, args.seed, args.n, **kw),
      # A check that cannot fail proves nothing: elements outside the group must fail.
      "outside_float64": check(run.model, variables, args.seed + 1,
                               max(args.n // 8, 2), float64=True, override="GL", **kw),
  }
  result["seconds"] = time.time() - t0
  print(f"largest relative logit deviation over {args.n} sampled elements, "
        f"{len(x)} validation images:")
  print(f"  float64: {result['float64']:.3e}   float32: {result['float32']:.3e}")
  print(f"  outside the group (generic invertible matrices, float64): "
        f"{result['outside_float64']:.3e}")
  _write_json(args.workdir, "symmetry_check.json", result)
  return result


def _accuracy(config, model, folded) -> float:
  from qlhs_jax import train
  return train.evaluate(config, lambda x: apply_folded(model, folded, x))["top1"]


def cmd_sparsify(args) -> dict:
  run, variables = _load(args)
  model, folded = prepare(run.model, variables, jnp.float32)
  group = group_for(model)
  print(f"group: continuous dimension {group.dimension}; "
        f"{sp.count_1x1(folded)} 1x1 weights")
  t0 = time.time()
  theta, history = sp.optimize(group, folded, args.steps, args.lr,
                               log=lambda i, l: print(f"  step {i}: L1 measure {l:.4f}"),
                               mixing=args.mixing)
  new = act(sp.exp_element(group, theta), folded)
  # Verify: the transformed weights compute the same logits, in float32 and (the same
  # Lie-algebra element, exponentiated in float64) in float64, where only the
  # symmetry's exactness remains.
  x = validation_images(run.config, args.images)
  dev32 = float(weak_lib.rel_error(model, folded, new, jnp.asarray(x))[0])
  with jax.enable_x64(True):
    m64, f64 = prepare(run.model, variables, jnp.float64)
    theta64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), theta)
    g64 = sp.exp_element(group_for(m64), theta64, jnp.float64)
    dev64 = float(weak_lib.rel_error(m64, f64, act(g64, f64),
                                     jnp.asarray(x, jnp.float64))[0])
  print(f"transformed model: relative logit deviation {dev32:.2e} (float32), "
        f"{dev64:.2e} (float64)")
  rows = []
  for f in args.fractions:
    po, pt = sp.prune(folded, f), sp.prune(new, f)
    rows.append({"fraction": f, "kept": sp.kept_fraction(po),
                 "top1_original": _accuracy(run.config, model, po),
                 "top1_transformed": _accuracy(run.config, model, pt)})
    print(f"  keep {f:.2f}: top-1 original {rows[-1]['top1_original']:.4f}, "
          f"transformed {rows[-1]['top1_transformed']:.4f}")
  result = {
      "model": run.config.model, "step": run.step, "steps": args.steps,
      "mixing": args.mixing,
      "learning_rate": args.lr, "weights_1x1": sp.count_1x1(folded),
      "l1_measure": [history[0], float(jax.jit(sp.l1_measure)(new, folded))],
      "l1_1x1_ratio": float(sp.l1_1x1(new, folded)),
      "logit_deviation_float32": dev32, "logit_deviation_float64": dev64,
      "rows": rows, "seconds": time.time() - t0}
  stem = "sparsify" if args.mixing else "sparsify_nomixing"
  _write_json(args.workdir, f"{stem}.json", result)
  _write_table(args.workdir, result, f"{stem}.md")
  _plot(args.workdir, result, f"{stem}.png")
  return result


def cmd_weak(args) -> dict:
  run, variables = _load(args)
  model, folded = prepare(run.model, variables, jnp.float32)
  x_fit = jnp.asarray(validation_images(run.config, args.images))
  x_eval = jnp.asarray(validation_images(run.config, args.images, offset=args.images))
  rows = weak_lib.search(model, folded, x_fit, x_eval, args.radii, args.steps, args.lr,
                         args.seed)
  result = {"model": run.config.model, "step": run.step,
            "stages": [group_for(model).stages[k].name
                       for k in weak_lib.gap_stages(group_for(model))],
            "rows": rows}
  lines = [f"Weak symmetry of {run.config.model} (step {run.step}), streams "
           f"{', '.join(result['stages'])}: {args.images} images to fit, "
           f"{args.images} held out.", "",
           "| radius | off-monomial | rel. logit error (fit) | rel. logit error "
           "(held out) | top-1 agreement | random direction: off-monomial / error "
           "(held out) / agreement |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['radius']:g} | {r['off_monomial']:.3f} | {r['error_fit']:.2e} | "
                 f"{r['error_eval']:.2e} | {r['top1_agree_eval']:.3f} | "
                 f"{r['random_off_monomial']:.3f} / {r['random_error_eval']:.2e} / "
                 f"{r['random_top1_agree_eval']:.3f} |")
  print("\n".join(lines))
  with open(os.path.join(args.workdir, "weak.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  _write_json(args.workdir, "weak.json", result)
  return result


def _write_json(workdir, name, obj):
  with open(os.path.join(workdir, name), "w") as f:
    json.dump(obj, f, indent=1)


def _write_table(workdir, r, name):
  over = "" if r["mixing"] else " (diagonal part of the group only)"
  lines = [f"Sparsification{over} of {r['model']} (step {r['step']}): "
           f"{r['weights_1x1']} 1x1 weights; L1 measure {r['l1_measure'][0]:.3f} -> {r['l1_measure'][1]:.3f} "
           f"after {r['steps']} steps (1x1 L1 ratio {r['l1_1x1_ratio']:.3f}); "
           f"transformed logits deviate by {r['logit_deviation_float32']:.1e} (float32), "
           f"{r['logit_deviation_float64']:.1e} (float64).", "",
           "| 1x1 weights kept | top-1, pruning original | top-1, pruning transformed |",
           "|---|---|---|"]
  for row in r["rows"]:
    lines.append(f"| {row['kept']:.3f} | {row['top1_original']:.4f} | "
                 f"{row['top1_transformed']:.4f} |")
  with open(os.path.join(workdir, name), "w") as f:
    f.write("\n".join(lines) + "\n")


def _plot(workdir, r, name):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  kept = [row["kept"] for row in r["rows"]]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(kept, [row["top1_original"] for row in r["rows"]], "o-", label="original")
  ax.plot(kept, [row["top1_transformed"] for row in r["rows"]], "s--",
          label="transformed (group)")
  ax.set_xlabel("fraction of 1x1 weights kept")
  ax.set_ylabel("validation top-1")
  ax.set_title(f"{r['model']}: magnitude pruning")
  ax.invert_xaxis()
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, name), dpi=120)
  plt.close(fig)


def _floats(text):
  return tuple(float(v) for v in text.split(","))


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m qlhs_jax.symmetry",
                                   description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--workdir", required=True, help="training run directory")
  common.add_argument("--which", default="latest", help="'latest', 'best' or a step")
  common.add_argument("--seed", type=int, default=0)
  common.add_argument("--images", type=int, default=64,
                      help="validation images for the logit comparisons")
  c = sub.add_parser("check", parents=[common], help="measure the symmetry")
  c.add_argument("--n", type=int, default=64, help="sampled group elements")
  c.add_argument("--batch_size", type=int, default=16,
                 help="elements evaluated at once (vmap), bounds memory")
  s = sub.add_parser("sparsify", parents=[common], help="lossless pruning")
  s.add_argument("--steps", type=int, default=1000)
  s.add_argument("--lr", type=float, default=0.02)
  s.add_argument("--fractions", type=_floats, default=DEFAULT_FRACTIONS,
                 help="comma-separated fractions of 1x1 weights to keep")
  s.add_argument("--mixing", action=argparse.BooleanOptionalAction, default=True,
                 help="--no-mixing: optimise the diagonal part only (no GL/O), an "
                 "ablation; writes sparsify_nomixing.*")
  w = sub.add_parser("weak", parents=[common], help="weak (data) symmetry search")
  w.add_argument("--steps", type=int, default=300)
  w.add_argument("--lr", type=float, default=0.02)
  w.add_argument("--radii", type=_floats, default=(0.01, 0.03, 0.1, 0.3, 1.0))
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  return {"check": cmd_check, "sparsify": cmd_sparsify, "weak": cmd_weak}[args.command](args)


if __name__ == "__main__":
  main()
