"""fuse_d_bn="xla" / "pallas": the model computes the same network as the plain autodiff
path (train-mode logits, running statistics, gradients, the train step), with the same
variables; unsupported combinations are refused. The Pallas kernels run in interpret mode
on the CPU; the operation itself is tested against float64 in tests/kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlhs_jax.models import QLHSNet

from tests.models.test_hidden_layout import (assert_trees_close, run_sharded_train_steps,
                                             run_train_steps)
from tests.kernels.test_stencil import spy_on_c, spy_on_kernels
from tests.models.test_qlhs import random_variables

# Stage 1 keeps its width, stage 2 strides and doubles it (both Eq.(5) group shapes).
TINY = dict(widths=(4, 8), depths=(1, 1), num_classes=5, stem="small")
X = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 3))
LABELS = jnp.arange(4) % 5


def train_outputs(model, v):
  def loss_fn(params):
    logits, new = model.apply({"params": params, "batch_stats": v["batch_stats"]}, X,
                              train=True, mutable=["batch_stats"])
    loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), LABELS])
    return loss, (logits, new["batch_stats"])
  (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
  return loss, logits, stats, grads


@pytest.mark.parametrize("fuse", ["xla", "pallas"])
@pytest.mark.parametrize("form,ws,bn_groups,remat", [
    ("eq3", True, 1, "none"), ("eq3", False, 2, "none"), ("eq3w", True, 1, "none"),
    ("eq5", True, 2, "none"), ("eq3", True, 1, "dots")])  # custom_vjp inside nn.remat
def test_fused_is_the_same_network(fuse, form, ws, bn_groups, remat):
  plain = QLHSNet(form=form, weight_sharing=ws, activation="softball", dtype=jnp.float32,
                  bn_groups=bn_groups, remat=remat, **TINY)
  assert_same_network(plain, plain.clone(fuse_d_bn=fuse))


def assert_same_network(plain, fused):
  """Same variables and initial values (checkpoints do not depend on fuse_d_bn); the
  plain path's train-mode loss, logits, running statistics and gradients; eval mode
  (never fused) identical."""
  key = jax.random.PRNGKey(0)
  assert_trees_close(fused.init(key, X, train=True), plain.init(key, X, train=True), 0, 0)
  v = random_variables(plain, X, lo=-0.7, hi=0.7)
  lp, zp, sp, gp = train_outputs(plain, v)
  lf, zf, sf, gf = train_outputs(fused, v)
  np.testing.assert_allclose(float(lf), float(lp), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(zf), np.asarray(zp), rtol=1e-4,
                             atol=1e-5 * float(jnp.max(jnp.abs(zp))))
  assert_trees_close(sf, sp, 1e-5, 1e-5)
  gscale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(gp))
  assert_trees_close(gf, gp, 1e-4, 1e-5 * gscale)
  # Eval mode and the folded model do not use the fused operation: identical.
  np.testing.assert_array_equal(fused.apply(v, X), plain.apply(v, X))


@pytest.mark.parametrize("fuse", ["xla", "pallas"])
def test_train_step_with_fused_d_bn(fuse):
  """Two jitted train steps of the harness (SGD-Nesterov, weight decay, label
  smoothing, running statistics) give the plain path's losses and parameters."""
  batch = {"image": X, "label": LABELS}
  plain = QLHSNet(dtype=jnp.float32, **TINY)
  v = random_variables(plain, X, lo=-0.7, hi=0.7)
  sp, lp = run_train_steps(plain, v, batch)
  sf, lf = run_train_steps(plain.clone(fuse_d_bn=fuse), v, batch)
  np.testing.assert_allclose(lf, lp, rtol=1e-5)
  assert_trees_close(sf.params, sp.params, 1e-4, 1e-5)
  assert_trees_close(sf.batch_stats, sp.batch_stats, 1e-4, 1e-5)


# Widths of at least 16 (Triton's dot); stage 1 has two stride-1 blocks, stage 2 a
# stride-2 block (gathered taps in the kernels).
TINY_BLOCK = dict(widths=(16, 32), depths=(2, 1), num_classes=5, stem="small")


@pytest.mark.parametrize("ws", [True, False])
def test_block_fused_is_the_same_network(ws):
  """fuse_d_bn="block" computes the plain path's network (assert_same_network)."""
  plain = QLHSNet(weight_sharing=ws, activation="softball", dtype=jnp.float32,
                  **TINY_BLOCK)
  assert_same_network(plain, plain.clone(fuse_d_bn="block"))


def forward_jaxpr(model):
  v = model.init(jax.random.PRNGKey(0), X, train=True)
  return str(jax.make_jaxpr(lambda v: model.apply(v, X, train=True,
                                                  mutable=["batch_stats"]))(v))


def test_block_fused_runs_its_kernels_in_every_block_without_bn_groups():
  """The lowered train-mode forward holds eq3_block's forward kernel once per block
  (the backward kernels run only under grad); with BatchNorm groups every block takes
  d_bn_product's "xla" passes instead."""
  jaxpr = forward_jaxpr(QLHSNet(dtype=jnp.float32, fuse_d_bn="block", **TINY_BLOCK))
  assert jaxpr.count("name=qlhs_eq3_forward_kernel\n") == 3
  assert jaxpr.count("name=qlhs_eq3_") == 3 and jaxpr.count("custom_vjp_call") == 3
  grouped = forward_jaxpr(QLHSNet(dtype=jnp.float32, fuse_d_bn="block", bn_groups=2,
                                  **TINY_BLOCK))
  assert "qlhs_eq3_" not in grouped and grouped.count("custom_vjp_call") == 3
  bad = QLHSNet(dtype=jnp.float32, fuse_d_bn="block", widths=(8, 16), depths=(1, 1),
                num_classes=5, stem="small")
  with pytest.raises(ValueError, match="power-of-two n >= 16.*fuse_d_bn='xla'"):
    bad.init(jax.random.PRNGKey(0), X, train=True)
  with pytest.raises(ValueError, match="fuse_d_bn='block' fuses eq3's two 1x1 maps"):
    QLHSNet(form="eq5", fuse_d_bn="block", **TINY_BLOCK).init(
        jax.random.PRNGKey(0), X, train=True)


def test_block_max_width_sends_wider_blocks_to_xla():
  """block_max_width=16: the two blocks with 16 input channels run eq3_block's kernels,
  the 32-channel one d_bn_product's "xla" passes; the same network as the plain path.
  A negative width, or a width without fuse_d_bn="block", is refused."""
  three = dict(TINY_BLOCK, widths=(16, 32, 64), depths=(1, 1, 1))
  mixed = QLHSNet(dtype=jnp.float32, fuse_d_bn="block", block_max_width=16, **three)
  jaxpr = forward_jaxpr(mixed)
  assert jaxpr.count("name=qlhs_eq3_forward_kernel\n") == 2
  assert jaxpr.count("custom_vjp_call") == 3
  assert forward_jaxpr(mixed.clone(block_max_width=32)).count(
      "name=qlhs_eq3_forward_kernel\n") == 3
  plain = QLHSNet(activation="softball", dtype=jnp.float32, **three)
  assert_same_network(plain, plain.clone(fuse_d_bn="block", block_max_width=16))
  for kw, msg in ((dict(fuse_d_bn="block", block_max_width=-1), "want an input width"),
                  (dict(fuse_d_bn="xla", block_max_width=16), "but fuse_d_bn is 'xla'")):
    with pytest.raises(ValueError, match=msg):
      QLHSNet(dtype=jnp.float32, **kw, **three).init(jax.random.PRNGKey(0), X, train=True)


def test_train_step_with_block_fused():
  """Two jitted train steps of the harness: the plain path's losses and parameters."""
  batch = {"image": X, "label": LABELS}
  plain = QLHSNet(dtype=jnp.float32, **TINY_BLOCK)
  v = random_variables(plain, X, lo=-0.7, hi=0.7)
  sp, lp = run_train_steps(plain, v, batch)
  sf, lf = run_train_steps(plain.clone(fuse_d_bn="block"), v, batch)
  np.testing.assert_allclose(lf, lp, rtol=1e-5)
  assert_trees_close(sf.params, sp.params, 1e-4, 1e-5)
  assert_trees_close(sf.batch_stats, sp.batch_stats, 1e-4, 1e-5)


def test_config_and_errors(tmp_path, monkeypatch):
  from qlhs_jax import config as config_lib
  from qlhs_jax import train
  c = config_lib.base_config("eq3_softball_ds")
  assert train.build_model(c, 5).fuse_d_bn == "none"  # the default
  c.model_overrides.fuse_d_bn = "pallas"
  assert train.build_model(c, 5).fuse_d_bn == "pallas"
  c.model_overrides.fuse_d_bn = "block"
  c.model_overrides.block_max_width = 128  # settable from the command line
  assert train.build_model(c, 5).block_max_width == 128
  x = jnp.zeros((2, 8, 8, 3))
  init = lambda **kw: QLHSNet(**TINY, **kw).init(jax.random.PRNGKey(0), x, train=True)
  with pytest.raises(ValueError, match=r"unknown fuse_d_bn 'triton'.*pallas"):
    init(fuse_d_bn="triton")
  with pytest.raises(ValueError, match=r"applies to the forms .*not 'eq4'"):
    init(fuse_d_bn="xla", form="eq4")
  with pytest.raises(ValueError, match="j_major hidden layout"):
    init(fuse_d_bn="xla", hidden_layout="s_major")
  with pytest.raises(ValueError, match="power-of-two expansion.*fuse_d_bn='xla'"):
    init(fuse_d_bn="pallas", expansion=6, weight_sharing=False)
  init(fuse_d_bn="xla", expansion=6, weight_sharing=False)  # the XLA passes take any e
  with monkeypatch.context() as mp:  # a TPU host: the Triton kernels cannot run there
    mp.setattr(jax, "default_backend", lambda: "tpu")
    with pytest.raises(ValueError, match="NVIDIA GPU .*not on 'tpu'; use fuse_d_bn='xla'"):
      init(fuse_d_bn="pallas")

  # On the 8-device mesh (conftest.py): "block" is one device's kernels, and the other
  # kernels run on each device's slice of the batch, which needs whole BatchNorm groups
  # there; both refused before anything is written.
  from tests.test_train import tiny_config
  cfg = tiny_config()
  cfg.model_overrides.fuse_d_bn = "block"
  with pytest.raises(ValueError, match="'block' runs on one device; this mesh has 8"):
    train.train_and_evaluate(cfg, str(tmp_path / "block"))
  assert not (tmp_path / "block").exists()
  cfg = tiny_config()
  cfg.sync_bn = True
  cfg.model_overrides.fuse_d_bn = "pallas"
  with pytest.raises(ValueError, match="fuse_d_bn='pallas' runs Pallas kernels on each "
                                       "device's slice.*1 BatchNorm group.*8 devices.*"
                                       "sync_bn=False"):
    train.train_and_evaluate(cfg, str(tmp_path / "pallas"))
  assert not (tmp_path / "pallas").exists()
  cfg.model_overrides.fuse_d_bn = "xla"
  for var, form in [("QLHS_SUMS_FORM", "pallas"), ("QLHS_STATS_FORM", "pallas_gram"),
                    ("QLHS_PRODUCT_FORM", "pallas")]:
    monkeypatch.setenv(var, form)
    with pytest.raises(ValueError, match=f"{var}={form} runs Pallas kernels on each "
                                         "device's slice"):
      train.train_and_evaluate(cfg, str(tmp_path / var))
    assert not (tmp_path / var).exists()
    monkeypatch.delenv(var)
  # The same forms asked for by config.kernels are refused by their keys.
  for key, form in [("sums_form", "pallas"), ("du_form", "pallas")]:
    cfg.kernels[key] = form
    with pytest.raises(ValueError, match=f"config.kernels.{key}={form} runs Pallas kernels "
                                         "on each device's slice"):
      train.train_and_evaluate(cfg, str(tmp_path / key))
    assert not (tmp_path / key).exists()
    cfg.kernels[key] = ""


def test_training_run_with_xla_fused_passes_on_8_devices(tmp_path):
  """train_and_evaluate on the 8-device mesh (per-replica BN groups, sharded batch):
  fuse_d_bn='xla' trains the plain path's network, 6 steps to close weights."""
  from qlhs_jax import checkpoint as ckpt_lib
  from qlhs_jax import train
  from tests.test_train import tiny_config
  runs = {}
  for fuse in ("none", "xla"):
    cfg = tiny_config(stop_after_steps=6)
    cfg.model_overrides.fuse_d_bn = fuse
    assert train.train_and_evaluate(cfg, str(tmp_path / fuse))["step"] == 6
    runs[fuse] = ckpt_lib.load_run(str(tmp_path / fuse)).variables
  assert_trees_close(runs["xla"], runs["none"], 1e-3, 1e-5)


def test_xla_train_step_on_a_sharded_mesh():
  """fuse_d_bn="xla" (optimization barriers, layout constraints) partitions over the
  8-device data mesh like the plain path: same losses and parameters."""
  x = jax.random.normal(jax.random.PRNGKey(4), (8, 8, 8, 3))
  plain = QLHSNet(dtype=jnp.float32, bn_groups=8, **TINY)
  out = {fuse: run_sharded_train_steps(plain.clone(fuse_d_bn=fuse), x, np.arange(8) % 5)
         for fuse in ("none", "xla")}
  np.testing.assert_allclose(out["xla"][1], out["none"][1], rtol=1e-5)
  assert_trees_close(out["xla"][0].params, out["none"][0].params, 1e-4, 1e-5)


@pytest.mark.parametrize("form", ["eq3", "eq5", "eq3w"])
def test_c_made_in_the_kernels_is_the_same_network(monkeypatch, form):
  """QLHS_C_FORM=kernels (with the dot forms, interpreted): the blocks whose c = C u
  reads D's input (eq3, eq5) hand C's weight to the fused operation, which makes c in
  its kernels; eq3w's C reads u, not D's input w u, and keeps its stored c. The same
  variables (C's weight created where the 1x1 map creates it), the plain path's
  train-mode outputs and gradients."""
  for var, value in (("QLHS_PRODUCT_FORM", "pallas_dot"), ("QLHS_SUMS_FORM", "pallas_dot"),
                     ("QLHS_STATS_FORM", "pallas"), ("QLHS_DU_FORM", "pallas"),
                     ("QLHS_C_FORM", "kernels")):
    monkeypatch.setenv(var, value)
  calls = spy_on_c(monkeypatch)
  plain = QLHSNet(form=form, activation="softball", dtype=jnp.float32, **TINY)
  assert_same_network(plain, plain.clone(fuse_d_bn="xla"))
  made = form != "eq3w"
  assert bool(calls.get("product_cw")) == made and bool(calls.get("product_c")) != made, calls


@pytest.mark.parametrize("c_form", ["stored", "kernels", "grads", "p"])
@pytest.mark.parametrize("form", ["eq3", "eq5", "eq3w"])
def test_dp_made_in_the_kernels_is_the_same_network(monkeypatch, form, c_form):
  """QLHS_DP_FORM=kernels (with the dot forms, interpreted; c stored or made; "grads":
  made, with QLHS_WEIGHT_GRADS=pass4; "p": and QLHS_P_FORM=kernels): the blocks whose
  product is followed by the 1x1 map A (eq3, eq3w) hand A's weight to the fused
  operation, which applies it and makes dp = dy A^T in its backward kernels (eq3's pass
  4 summing C's and A's gradients under "grads" and "p"; under "p" eq3's forward
  product applies A in its kernel, ``stencil.product_a``); eq5's product is summed in
  groups, not mapped, and returns p. The same variables (A's weight created where the
  1x1 map creates it), the plain path's train-mode outputs and gradients."""
  for var, value in (("QLHS_PRODUCT_FORM", "pallas_dot"), ("QLHS_SUMS_FORM", "pallas_dot"),
                     ("QLHS_STATS_FORM", "pallas"), ("QLHS_DU_FORM", "pallas"),
                     ("QLHS_C_FORM", "stored" if c_form == "stored" else "kernels"),
                     ("QLHS_DP_FORM", "kernels"),
                     ("QLHS_WEIGHT_GRADS",
                      "pass4" if c_form in ("grads", "p") else "xla"),
                     ("QLHS_P_FORM", "kernels" if c_form == "p" else "stored")):
    monkeypatch.setenv(var, value)
  calls = spy_on_c(monkeypatch)
  plain = QLHSNet(form=form, activation="softball", dtype=jnp.float32, **TINY)
  assert_same_network(plain, plain.clone(fuse_d_bn="xla"))
  with_a = {k for k in calls if "_aw" in k}
  c = "cw" if c_form != "stored" and form != "eq3w" else "c"
  grads = "_grads" if c == "cw" and c_form in ("grads", "p") else ""
  assert with_a == ({f"dx_dc_{c}_aw{grads}", f"bn_sums_{c}_aw"} if form != "eq5"
                    else set()), calls
  assert bool(calls.get("product_a")) == (c_form == "p" and form == "eq3"), calls


@pytest.mark.parametrize("form,c_form,du_form", [
    ("eq3", "grads", "pallas"), ("eq3", "grads", "pallas_dot"), ("eq3", "stored", "pallas"),
    ("eq5", "kernels", "pallas"), ("eq3w", "grads", "pallas")])
def test_du_summed_in_its_kernel_is_the_same_network(monkeypatch, form, c_form, du_form):
  """QLHS_DU_SUM=kernel (with the dot forms, interpreted): the blocks whose shortcut is
  their input u (eq3, eq5; here stage 1's) take it from the fused operation, which hands
  u back, and du's kernel adds the shortcut's gradient, and C's share where the
  operation makes c ("grads", "kernels"), before it stores du: two addends, or one with
  c stored. Stage 2's block (stride 2, a 1x1 shortcut) and eq3w's (D reads w u, not u)
  keep XLA's add: none. The same variables, the plain path's train-mode outputs and
  gradients."""
  from qlhs_jax.kernels import stencil
  for var, value in (("QLHS_PRODUCT_FORM", "pallas_dot"), ("QLHS_SUMS_FORM", "pallas_dot"),
                     ("QLHS_STATS_FORM", "pallas"), ("QLHS_DU_FORM", du_form),
                     ("QLHS_C_FORM", "stored" if c_form == "stored" else "kernels"),
                     ("QLHS_DP_FORM", "kernels" if c_form == "grads" else "stored"),
                     ("QLHS_WEIGHT_GRADS", "pass4" if c_form == "grads" else "xla"),
                     ("QLHS_DU_SUM", "kernel")):
    monkeypatch.setenv(var, value)
  addends = []
  real = stencil.d_transpose
  monkeypatch.setattr(stencil, "d_transpose", lambda *a, **k: addends.append(
      len(k.get("addends", ()))) or real(*a, **k))
  plain = QLHSNet(form=form, activation="softball", dtype=jnp.float32, **TINY)
  assert_same_network(plain, plain.clone(fuse_d_bn="xla"))
  stage1 = 0 if form == "eq3w" else 1 if c_form == "stored" else 2
  assert sorted(addends) == sorted([stage1, 0]), addends


def spy(monkeypatch, module, name):
  """Counts the calls of ``module.name`` (at trace time)."""
  calls = []
  real = getattr(module, name)
  monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
  return calls


def test_auto_is_xla_where_the_kernels_run_and_none_elsewhere(monkeypatch):
  """fuse_d_bn="auto": where ``d_bn_product.stencil_on_gpu`` picks the Pallas kernels
  (one NVIDIA GPU; here made to, the kernels interpreted) the "xla" operation with the
  kernels computes the plain network; elsewhere (this CPU, other forms) the plain path
  itself runs."""
  from qlhs_jax.kernels import d_bn_product as dbn
  from qlhs_jax.kernels import stencil
  for var in ("QLHS_STATS_FORM", "QLHS_SUMS_FORM", "QLHS_DU_FORM"):
    monkeypatch.delenv(var, raising=False)
  plain = QLHSNet(activation="softball", dtype=jnp.float32, **TINY)
  auto = plain.clone(fuse_d_bn="auto")
  v = random_variables(plain, X, lo=-0.7, hi=0.7)
  calls = spy(monkeypatch, stencil, "tap_stats")
  # Here (a CPU): the plain path, the same computation.
  for got, want in zip(jax.tree.leaves(train_outputs(auto, v)),
                       jax.tree.leaves(train_outputs(plain, v))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert not calls
  eq7 = QLHSNet(form="eq7", fuse_d_bn="auto", dtype=jnp.float32, **TINY)
  eq7.init(jax.random.PRNGKey(0), X, train=True)  # not a fused form: plain, no error
  monkeypatch.setattr(dbn, "stencil_on_gpu", lambda n, groups=1, e=1: groups == 1)
  assert_same_network(plain, auto)
  assert calls, "fuse_d_bn='auto' did not reach the stencil kernels where they run"


FORM_VARS = ("QLHS_STATS_FORM", "QLHS_SUMS_FORM", "QLHS_DU_FORM", "QLHS_PRODUCT_FORM")


@pytest.mark.parametrize("fuse,rows,c_form,dp_form,du_sum", [
    ("xla", "", "stored", "stored", "xla"), ("xla", "dx_du", "stored", "stored", "xla"),
    ("xla", "bwd", "stored", "stored", "xla"), ("pallas", "", "stored", "stored", "xla"),
    ("xla", "", "kernels", "stored", "xla"), ("xla", "", "kernels", "kernels", "xla"),
    ("xla", "", "kernels", "grads", "xla"), ("xla", "", "kernels", "grads", "kernel"),
    ("xla", "", "kernels", "p", "kernel"), ("xla", "bwd", "stored", "stored", "kernel")])
def test_kernels_run_on_each_device_of_a_sharded_mesh(fuse, rows, c_form, dp_form, du_sum,
                                                      monkeypatch):
  """On the 8-device data mesh with per-replica BatchNorm, the Pallas kernels (every
  stencil form asked for, or fuse_d_bn="pallas"; interpreted; with ``rows``, pass 4
  and du as one walk, or the backward's walk and du_bn; ``c_form`` "kernels": the dot
  forms making c = C u from C's weight, given whole to each device; ``dp_form``
  "kernels": making dp = dy A^T from A's weight, given whole too; "grads": and pass 4
  summing C's and A's gradients over each device's slice; "p": and the forward product
  applying A in its kernel, p never stored; ``du_sum`` "kernel": u handed
  back for the shortcut, its gradient added in du's kernel, or after the backward's
  walk) run on each device's slice of the batch under shard_map: the plain path's
  losses and parameters after two steps, the gradients of D's kernel, of BN's scale and
  offset (and of C and A) summed over the devices."""
  from qlhs_jax.kernels import d_bn_product as dbn
  from qlhs_jax.kernels import stencil
  x = jax.random.normal(jax.random.PRNGKey(4), (8, 8, 8, 3))
  plain = QLHSNet(dtype=jnp.float32, bn_groups=8, **TINY)
  v = random_variables(plain, x, lo=-0.7, hi=0.7)  # BN_out's scale not 0 as at init
  ref = run_sharded_train_steps(plain, x, np.arange(8) % 5, variables=v)
  for var in FORM_VARS:
    monkeypatch.setenv(var, "pallas")
  per_device = spy(monkeypatch, dbn, "_per_device_op")
  if c_form == "kernels":
    for var in ("QLHS_PRODUCT_FORM", "QLHS_SUMS_FORM"):
      monkeypatch.setenv(var, "pallas_dot")
  monkeypatch.setenv("QLHS_C_FORM", c_form)
  monkeypatch.setenv("QLHS_DP_FORM", "stored" if dp_form == "stored" else "kernels")
  monkeypatch.setenv("QLHS_WEIGHT_GRADS", "pass4" if dp_form in ("grads", "p") else "xla")
  monkeypatch.setenv("QLHS_P_FORM", "kernels" if dp_form == "p" else "stored")
  monkeypatch.setenv("QLHS_DU_SUM", du_sum)
  made = spy_on_c(monkeypatch)
  monkeypatch.setenv("QLHS_STENCIL_ROWS", rows)
  kernels = (spy(monkeypatch, stencil, rows) if rows
             else spy(monkeypatch, stencil, "tap_stats") if fuse == "xla"
             else spy(monkeypatch, dbn, "_pallas_stats"))
  out = run_sharded_train_steps(plain.clone(fuse_d_bn=fuse), x, np.arange(8) % 5,
                                variables=v)
  assert per_device and kernels
  assert bool(made.get("product_cw")) == (c_form == "kernels" and dp_form != "p"), made
  assert bool(made.get("dx_dc_cw_aw")) == (dp_form == "kernels"), made
  assert bool(made.get("dx_dc_cw_aw_grads")) == (dp_form in ("grads", "p")), made
  assert bool(made.get("product_a")) == (dp_form == "p"), made
  np.testing.assert_allclose(out[1], ref[1], rtol=1e-5)
  assert_trees_close(out[0].params, ref[0].params, 1e-4, 1e-5)
  assert_trees_close(out[0].batch_stats, ref[0].batch_stats, 1e-4, 1e-5)


def test_kernels_on_a_mesh_need_whole_batchnorm_groups_per_device(monkeypatch):
  """Synchronised BatchNorm (one group over the 8 devices) with a kernel asked for: the
  step is refused at trace time, naming the fix (train_and_evaluate refuses it before
  that, test_config_and_errors)."""
  x = jax.random.normal(jax.random.PRNGKey(4), (8, 8, 8, 3))
  monkeypatch.setenv("QLHS_DU_FORM", "pallas")
  with pytest.raises(ValueError, match="QLHS_DU_FORM=pallas runs Pallas kernels on each "
                                       "device's slice.*1 BatchNorm group.*per-replica"):
    run_sharded_train_steps(QLHSNet(dtype=jnp.float32, bn_groups=1, fuse_d_bn="xla",
                                    **TINY), x, np.arange(8) % 5)
  # The plain path's shifted_t backward calls the du kernel outside d_bn_product: one
  # device's only.
  with pytest.raises(ValueError, match="QLHS_DU_FORM=pallas with d_impl='shifted_t' "
                                       "runs on one device; this step splits the batch "
                                       "over 8"):
    run_sharded_train_steps(QLHSNet(dtype=jnp.float32, bn_groups=8, d_impl="shifted_t",
                                    **TINY), x, np.arange(8) % 5)


def test_batch_shards_follow_the_steps_mesh(monkeypatch):
  """Outside a step: no mesh, one shard. In ``steps.batch_mesh``: the data axis's 8;
  inside d_bn_product's shard_map: 1 again (each device sees its slice). auto's
  kernels need one BatchNorm group per device and the batch axis alone on the mesh."""
  from qlhs_jax import steps as S
  from qlhs_jax.kernels import d_bn_product as dbn
  mesh = S.make_mesh()
  monkeypatch.setattr(dbn, "_nvidia_gpu", lambda: True)
  assert dbn.batch_shards() == 1
  assert not dbn.stencil_on_gpu(64, 1)  # 8 devices, no mesh: XLA would gather
  with S.batch_mesh(mesh):
    assert dbn.batch_shards() == 8
    assert dbn.stencil_on_gpu(64, 8) and dbn.stencil_on_gpu(64, 8, 4)
    assert not dbn.stencil_on_gpu(64, 1) and not dbn.stencil_on_gpu(64, 16)
    assert not dbn.stencil_on_gpu(48, 8)
    seen = jax.shard_map(lambda v: v * dbn.batch_shards(), mesh=mesh,
                         in_specs=jax.sharding.PartitionSpec("data"),
                         out_specs=jax.sharding.PartitionSpec("data"))(jnp.ones(8))
    np.testing.assert_array_equal(seen, np.ones(8))
  with S.batch_mesh(S.make_mesh(jax.devices()[:1])):  # a one-device step on 8 devices
    assert dbn.batch_shards() == 1 and dbn.stencil_on_gpu(64, 1)


def test_auto_runs_the_kernels_per_device_on_a_gpu_mesh(monkeypatch):
  """fuse_d_bn="auto" on a mesh of NVIDIA GPUs (here the CPU mesh, made to count as
  one; the kernels interpreted) with per-replica BatchNorm: the "xla" operation with
  the stencil kernels on each device, the plain path's training steps."""
  from qlhs_jax.kernels import d_bn_product as dbn
  for var in FORM_VARS:
    monkeypatch.delenv(var, raising=False)
  x = jax.random.normal(jax.random.PRNGKey(4), (8, 8, 8, 3))
  plain = QLHSNet(dtype=jnp.float32, bn_groups=8, **TINY)
  v = random_variables(plain, x, lo=-0.7, hi=0.7)
  ref = run_sharded_train_steps(plain, x, np.arange(8) % 5, variables=v)
  monkeypatch.setattr(dbn, "_nvidia_gpu", lambda: True)
  calls = spy_on_kernels(monkeypatch)
  out = run_sharded_train_steps(plain.clone(fuse_d_bn="auto"), x, np.arange(8) % 5,
                                variables=v)
  assert all(calls[k] for k in ("tap_stats", "bn_sums", "d_transpose")), calls
  np.testing.assert_allclose(out[1], ref[1], rtol=1e-5)
  assert_trees_close(out[0].params, ref[0].params, 1e-4, 1e-5)
