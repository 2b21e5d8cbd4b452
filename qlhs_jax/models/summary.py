"""``python -m qlhs_jax.models.summary NAME [--size 224]``: layer table, parameters, MACs.

MACs follow the usual convention (fvcore, thop): multiply-accumulates of convolutions
and dense layers, counted from the jaxpr of one forward pass at batch 1. ``D`` is
counted in its grouped-convolution form (9 MACs per output); the element-wise products
of the blocks and the normalisations are not counted.
"""

from __future__ import annotations

import argparse
import math
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from qlhs_jax.models import registry


def _eqn_macs(eqn) -> int:
  prim = eqn.primitive.name
  out = eqn.outvars[0].aval
  if prim == "conv_general_dilated":
    rhs = eqn.invars[1].aval
    out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    return math.prod(out.shape) * math.prod(rhs.shape) // rhs.shape[out_dim]
  if prim == "dot_general":
    (lc, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    return math.prod(out.shape) * math.prod(lhs.shape[d] for d in lc)
  return 0


def _jaxpr_macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    total += _eqn_macs(eqn)
    for sub in jax_core.jaxprs_in_params(eqn.params):
      total += _jaxpr_macs(sub)
  return total


def count_macs(model, size: int = 224) -> int:
  """Forward MACs of one ``size`` x ``size`` image (the stem's zero input channel and
  the zero taps of its space-to-depth form, implementation details, not counted)."""
  if hasattr(model, "d_impl"):
    model = model.clone(d_impl="grouped")
  if hasattr(model, "stem_pad_channels"):
    model = model.clone(stem_pad_channels=0, stem_conv="direct")
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables)
  return _jaxpr_macs(jaxpr.jaxpr)


def count_params(model, size: int = 32) -> int:
  """Trainable parameters (BatchNorm running statistics excluded, as PyTorch counts)."""
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"]))


def summary(name: str, size: int = 224, depth: int = 1, **overrides) -> str:
  model = registry.create(name, **overrides)
  meta = registry.info(name)
  table = nn.tabulate(model, jax.random.PRNGKey(0), depth=depth,
                      console_kwargs={"width": 140, "force_terminal": False})(
                          jnp.zeros((1, size, size, 3), jnp.float32), train=False)
  params, macs = count_params(model), count_macs(model, size)
  lines = [table, f"model        {name}: {meta.description}",
           f"parameters   {params:,} trainable (the table's total also counts BatchNorm "
           "running statistics)" + (f"; paper, Table 1: {meta.paper_params}M"
                                    if meta.paper_params else ""),
           f"MACs         {macs / 1e9:.3f} G per {size}x{size} image (forward)"]
  if meta.paper_top1:
    lines.append(f"paper top-1  {meta.paper_top1} (ImageNet-100, 50 epochs)")
  return "\n".join(lines)


def zoo_table(size: int = 224) -> str:
  """One line per registered model: parameters, Table 1 figures, MACs."""
  rows = ["| model | parameters | Table 1 params | Table 1 top-1 | GMACs at "
          f"{size} |", "|---|---:|---:|---:|---:|"]
  for name in registry.names():
    m, meta = registry.create(name), registry.info(name)
    paper = f"{meta.paper_params}M" if meta.paper_params else "-"
    top1 = f"{meta.paper_top1}" if meta.paper_top1 else "-"
    rows.append(f"| {name} | {count_params(m):,} | {paper} | {top1} | "
                f"{count_macs(m, size) / 1e9:.3f} |")
  return "\n".join(rows)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("name", nargs="?", choices=registry.names(), metavar="NAME",
                      help="one of: " + ", ".join(registry.names()))
  parser.add_argument("--all", action="store_true",
                      help="a Markdown table of every registered model instead")
  parser.add_argument("--size", type=int, default=224, help="image size (default 224)")
  parser.add_argument("--depth", type=int, default=1, help="module depth of the table")
  args = parser.parse_args(argv)
  if args.all:
    print(zoo_table(args.size))
  elif args.name:
    print(summary(args.name, args.size, args.depth))
  else:
    parser.error("give a model NAME or --all")


if __name__ == "__main__":
  sys.exit(main())
