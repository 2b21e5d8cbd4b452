"""The commands on a real (tiny, briefly trained) run: check, sparsify; weak on its own."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlhs_jax import config as qconfig
from qlhs_jax import train
from qlhs_jax.models import registry
from qlhs_jax.symmetry import measure
from qlhs_jax.symmetry import weak
from qlhs_jax.symmetry.__main__ import main, parse_args

from tests.symmetry.symmetry_helpers import TINY, random_variables


def tiny_run(model, workdir):
  c = qconfig.apply_quickstart(qconfig.base_config(model))
  c.data.image_size = 16
  c.model_overrides.widths = (4, 8)
  c.model_overrides.depths = (1, 1)
  c.batch_size = 32
  c.eval_batch_size = 120
  c.epochs = 1
  c.stop_after_steps = 4
  c.progress_bar = False
  train.train_and_evaluate(c, workdir)
  return workdir


def test_check_and_sparsify_commands(tmp_path):
  wd = tiny_run("eq3w_softball_ds", str(tmp_path / "run"))
  r = main(["check", "--workdir", wd, "--n", "4", "--images", "8"])
  assert r["float64"] < 1e-10 and r["float32"] < 1e-4, r
  assert r["outside_float64"] > 1e-3, r
  assert os.path.exists(os.path.join(wd, "symmetry_check.json"))
  s = main(["sparsify", "--workdir", wd, "--steps", "6", "--fractions", "1,0.3",
            "--images", "8"])
  assert s["logit_deviation_float64"] < 1e-10 and s["logit_deviation_float32"] < 1e-4
  assert s["l1_measure"][1] < s["l1_measure"][0]            # the descent descended
  full, pruned = s["rows"]
  assert full["kept"] == 1 and full["top1_original"] == full["top1_transformed"]
  assert abs(pruned["kept"] - 0.3) < 0.01
  for name in ("sparsify.md", "sparsify.json", "sparsify.png"):
    assert os.path.getsize(os.path.join(wd, name)) > 100


def test_arguments():
  a = parse_args(["sparsify", "--workdir", "w", "--fractions", "1,0.5"])
  assert a.fractions == (1.0, 0.5) and a.which == "latest"
  with pytest.raises(SystemExit):
    parse_args(["prune", "--workdir", "w"])


def test_weak_search_on_the_literal_form():
  """The literal Eq.(3) under softball: stage 2 is O(n) by its activations but only
  signed permutations exactly. The search moves off the monomials by the radius asked
  for and, on the data it fits, does at least as well as a random direction."""
  with jax.enable_x64(True):
    m = registry.create("eq3_softball_ds", **TINY)
    m, folded = measure.prepare(m, random_variables(m), jnp.float64)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 3)))
    assert weak.gap_stages(__import__("qlhs_jax.symmetry", fromlist=["group_for"])
                           .group_for(m)) == [1]
    rows = weak.search(m, folded, x, x[:2], radii=(0.3,), steps=20)
  (row,) = rows
  assert 0.1 < row["off_monomial"] < 0.5
  assert row["error_fit"] <= row["random_error_fit"] * 1.01
  assert row["random_error_fit"] > 1e-3       # off the exact group, logits move
