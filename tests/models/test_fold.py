"""BatchNorm folding: the folded forward equals eval mode, in float32 and float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlhs_jax.models import (MobileNetV3Large, QLHSNet, ResNet, apply_folded,
                             fold_batchnorm)
from qlhs_jax.models.qlhs import FORMS

from tests.models.test_qlhs import random_variables

TINY = dict(widths=(8, 16), depths=(1, 2), num_classes=5, stem="small")


def _check(model, x, tol):
  v = random_variables(model, x)
  params, stats = v["params"], v["batch_stats"]
  ref = jax.jit(model.apply)({"params": params, "batch_stats": stats}, x)
  folded = fold_batchnorm(model, params, stats)
  assert not any("bn" in str(path) for path, _ in
                 jax.tree_util.tree_flatten_with_path(folded)[0])
  out = jax.jit(lambda f, x: apply_folded(model, f, x))(folded, x)
  err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
  assert err < tol, err
  return folded


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("ws", [True, False])
def test_fold_qlhs_float32(form, ws):
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 12, 12, 3))
  _check(QLHSNet(form=form, weight_sharing=ws, dtype=jnp.float32, **TINY), x, 1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_fold_qlhs_float64(form):
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 12, 12, 3), jnp.float64)
    m = QLHSNet(form=form, dtype=jnp.float64, param_dtype=jnp.float64, **TINY)
    folded = _check(m, x, 1e-12)
    blk = folded["stage2_block0"]
    assert blk["d_kernel"].shape == (3, 3, 8, 4)  # per-channel after folding
    assert blk["shortcut"]["kernel"].shape == (1, 1, 8, 16)


def test_fold_baselines():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 32, 32, 3))
  _check(ResNet(widths=(8, 16), depths=(1, 1), stem="small", dtype=jnp.float32), x, 1e-5)
  with jax.enable_x64(True):
    x64 = x.astype(jnp.float64)
    _check(MobileNetV3Large(num_classes=7, dtype=jnp.float64, param_dtype=jnp.float64),
           x64, 1e-12)


def test_fold_is_pure_and_jittable():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 12, 12, 3))
  m = QLHSNet(dtype=jnp.float32, **TINY)
  v = m.init(jax.random.PRNGKey(0), x)
  a = fold_batchnorm(m, v["params"], v["batch_stats"])
  b = jax.jit(lambda p, s: fold_batchnorm(m, p, s))(v["params"], v["batch_stats"])
  for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(la), np.asarray(lb), rtol=1e-6)
