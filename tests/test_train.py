"""train_and_evaluate end to end on the embedded digits, with a tiny Eq.(3) network."""

import inspect
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlhs_jax import checkpoint as ckpt_lib
from qlhs_jax import config as qconfig
from qlhs_jax import data as data_lib
from qlhs_jax import steps as S
from qlhs_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(model="eq3_softball_ds", **overrides):
  c = qconfig.apply_quickstart(qconfig.base_config(model))
  c.data.image_size = 16
  c.model_overrides.widths = (4, 8)
  c.model_overrides.depths = (1, 1)
  c.batch_size = 32           # 44 steps per epoch on the 1,437 training digits
  c.eval_batch_size = 120
  c.epochs = 2
  c.progress_bar = False
  c.log_every_steps = 3
  for k, v in overrides.items():
    c[k] = v
  return c


def leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb))


def test_resume_refuse_and_init_from(tmp_path):
  """6 steps, stop, resume to 12 in the same workdir: bit-identical to 12 steps straight.
  Then the same workdir refuses another config, and serves as init_from."""
  wd = str(tmp_path / "resumed")
  r1 = train.train_and_evaluate(tiny_config(stop_after_steps=6), wd)
  r2 = train.train_and_evaluate(tiny_config(stop_after_steps=12), wd)
  assert (r1["status"], r1["step"], r2["status"], r2["step"]) == (
      "stopped", 6, "stopped", 12)
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(tiny_config(stop_after_steps=12), straight)
  a, b = ckpt_lib.load_run(wd), ckpt_lib.load_run(straight)
  assert a.step == b.step == 12
  assert leaves_equal(a.variables, b.variables)
  abstract = train.abstract_train_state(tiny_config(), 10, jax.device_count())[2]
  sa, _ = ckpt_lib.RunCheckpoints(wd, read_only=True).restore(12, abstract)
  sb, _ = ckpt_lib.RunCheckpoints(straight, read_only=True).restore(12, abstract)
  assert leaves_equal(sa, sb)  # optimizer state, rng, counters too
  events = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert any(e.get("event") == "resume" and e["step"] == 6 for e in events)
  # the weights moved since step 0: the comparison above is not vacuous
  assert not leaves_equal(a.variables, ckpt_lib.load_run(straight, which="0").variables)

  # The workdir refuses a different config and keeps its own.
  with pytest.raises(ValueError, match=r"(?s)different config:\n  learning_rate: saved "
                     r"0.3, now 0.1.*allow_config_change"):
    train.train_and_evaluate(tiny_config(stop_after_steps=12, learning_rate=0.1), wd)
  assert json.load(open(os.path.join(wd, "config.json")))["learning_rate"] == 0.3

  # init_from: weights only, and a clear error for another shape.
  out = str(tmp_path / "finetune")
  r = train.train_and_evaluate(tiny_config(stop_after_steps=1, init_from=wd), out)
  assert r["step"] == 1  # the step counter starts again
  events = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
  assert any(e.get("event") == "init_from" for e in events)
  bad = tiny_config(stop_after_steps=1, init_from=wd)
  bad.model_overrides.widths = (4, 16)
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"shape of params/stage2_block0/a: checkpoint \(16, 8\), "
                           r"model \(16, 16\)"):
    train.train_and_evaluate(bad, str(tmp_path / "bad"))


def test_config_kernels_reach_the_traced_model_and_may_change_on_resume(tmp_path,
                                                                         monkeypatch):
  """config.kernels is what the model reads while the steps are traced (not the
  environment), config.json records it, and a resume may change it (runtime keys)."""
  from qlhs_jax.kernels import settings
  from qlhs_jax.models import common
  monkeypatch.delenv("QLHS_BN_STATS", raising=False)
  seen = []
  read = common.bn_stats_form
  monkeypatch.setattr(common, "bn_stats_form", lambda: seen.append(read()) or seen[-1])
  wd = str(tmp_path / "run")
  cfg = tiny_config(stop_after_steps=1)
  cfg.kernels.bn_stats = "two"
  assert train.train_and_evaluate(cfg, wd)["step"] == 1
  assert seen and set(seen) == {"two"}
  assert json.load(open(os.path.join(wd, "config.json")))["kernels.bn_stats"] == "two"
  assert settings.get("QLHS_BN_STATS") == ""  # left as it was
  seen.clear()
  # The resume takes BatchNorm's form from the variable (the key left empty).
  monkeypatch.setenv("QLHS_BN_STATS", "one")
  assert train.train_and_evaluate(tiny_config(stop_after_steps=2), wd)["step"] == 2
  assert seen and set(seen) == {"one"}
  # config.json keeps the first run's runtime keys, as it keeps its stop_after_steps;
  # each launch records its own, with where its kernel settings came from.
  assert json.load(open(os.path.join(wd, "config.json")))["stop_after_steps"] == 1
  recs = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  launches = [r for r in recs if r["split"] == "launch"]
  assert [r["step"] for r in launches] == [0, 1]
  first, second = launches
  assert first["kernels"] == {"bn_stats": "two"}
  assert second["kernels"] == {"bn_stats": "one"}
  assert first["runtime"]["kernels.bn_stats"] == "two"
  assert second["runtime"]["kernels.bn_stats"] == ""  # so "one" came from the variable
  assert [r["runtime"]["stop_after_steps"] for r in launches] == [1, 2]
  assert set(first["runtime"]) == qconfig.RUNTIME_KEYS
  # config.xla_fma is on; on this CPU nothing compiles for a GPU, so it is not in effect.
  assert first["runtime"]["xla_fma"] is True and first["xla_fma"] is False
  dev = jax.devices()[0]
  assert first["devices"] == f"{jax.device_count()} x {dev.platform}:{dev.device_kind}"
  assert first["mesh"] == {S.DATA_AXIS: jax.device_count()}
  assert first["versions"]["jax"] == jax.__version__
  from qlhs_jax import provenance
  assert first["code"] == provenance.code_version()  # tests/test_provenance checks it
  import flax
  assert first["versions"]["flax"] == flax.__version__


def test_full_epochs_evaluate_and_keep_best(tmp_path):
  wd = str(tmp_path / "run")
  result = train.train_and_evaluate(tiny_config(epochs=2), wd)
  assert result["status"] == "finished" and result["step"] == 88
  assert 0.0 <= result["top1"] <= result["top5"] <= 1.0 and result["count"] == 360
  recs = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  val = [r for r in recs if r["split"] == "validation"]
  assert [r["epoch"] for r in val] == [1, 2]
  assert any(r["split"] == "train" and r["img_per_s"] > 0 for r in recs)
  assert os.listdir(os.path.join(wd, "tb"))
  cfg = json.load(open(os.path.join(wd, "config.json")))
  assert cfg["model"] == "eq3_softball_ds" and cfg["batch_size"] == 32
  ckpts = ckpt_lib.RunCheckpoints(wd, read_only=True)
  assert ckpts.latest_step() == 88
  best = max(val, key=lambda r: r["top1"])["step"]
  assert ckpts.best_step() == best
  # eval-only mode reproduces the final validation numbers from the checkpoint
  again = train.train_and_evaluate(tiny_config(epochs=2, eval_only=True), wd)
  assert again["status"] == "evaluated"
  assert again["top1"] == pytest.approx(result["top1"]) and again["count"] == 360
  # evaluate() on a plain logits function gives the same numbers
  run = ckpt_lib.load_run(wd)
  direct = train.evaluate(run.config, lambda x: run.model.apply(run.variables, x))
  assert direct["top1"] == pytest.approx(result["top1"])
  # a finished run does nothing more on a rerun
  assert train.train_and_evaluate(tiny_config(epochs=2), wd)["step"] == 88


def test_nan_is_skipped_restored_and_lr_scaled(tmp_path, monkeypatch):
  """A NaN injected into the batch at step 5 of the first attempt: the step skips it,
  the loop restores the last good checkpoint (step 3) and halves the lr."""
  make = S.make_train_step

  def poisoned(model, tx, lr_fn, images_fn, **kw):
    # The poison multiplies the model's input: the train batches are uint8.
    step = make(model, tx, lr_fn, **kw,
                images_fn=lambda batch: images_fn(batch) * batch["poison"])

    def wrapped(state, batch):
      bad = (state.step == 5) & (state.lr_scale == 1.0)
      return step(state, {**batch, "poison": jnp.where(bad, jnp.nan, 1.0)})
    return wrapped
  monkeypatch.setattr(S, "make_train_step", poisoned)
  wd = str(tmp_path / "nan")
  r = train.train_and_evaluate(
      tiny_config(stop_after_steps=9, checkpoint_every_steps=3), wd)
  assert r["nan_retries"] == 1 and r["step"] == 9
  events = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  nan = [e for e in events if e.get("event") == "non_finite"]
  assert len(nan) == 1 and "restored step 3" in nan[0]["message"]
  run = ckpt_lib.load_run(wd)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(run.variables))
  state, _ = ckpt_lib.RunCheckpoints(wd, read_only=True).restore(
      9, train.abstract_train_state(tiny_config(), 10, jax.device_count())[2])
  assert float(state.lr_scale) == 0.5


def test_nan_every_time_fails_clearly(tmp_path, monkeypatch):
  make = S.make_train_step

  def always_nan(model, tx, lr_fn, images_fn, **kw):
    return make(model, tx, lr_fn, **kw, images_fn=lambda b: images_fn(b) * jnp.nan)
  monkeypatch.setattr(S, "make_train_step", always_nan)
  with pytest.raises(train.NonFiniteTrainingError, match="still after 2 restarts"):
    train.train_and_evaluate(tiny_config(stop_after_steps=20, nan_max_retries=2),
                             str(tmp_path / "nan"))


def test_bad_configs_fail_clearly(tmp_path):
  c = tiny_config()
  with pytest.raises(AttributeError, match="learning_rte"):
    c.learning_rte = 0.1  # the config is locked: typos fail where they are made
  c = tiny_config()
  c.model = "eq3_softbal_ds"
  with pytest.raises(ValueError, match="did you mean 'eq3_softball_ds'"):
    train.train_and_evaluate(c, str(tmp_path / "a"))
  with pytest.raises(ValueError, match="does not divide by the 8 devices"):
    train.train_and_evaluate(tiny_config(batch_size=36), str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "b" / "config.json")


def test_imagenet_config_without_data_gives_the_preparation_command(tmp_path):
  sys.path.insert(0, REPO)
  try:
    from configs import eq3
  finally:
    sys.path.remove(REPO)
  c = eq3.get_config("hardball_ds")
  c.data.data_dir = str(tmp_path / "tfds")
  with pytest.raises(data_lib.DatasetNotFoundError, match="tfds build imagenet2012"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")  # nothing written


def test_every_model_override_can_be_set_on_the_command_line():
  """The config's model_overrides start unset (None); each is a typed placeholder, so
  that --config.model_overrides.KEY=VALUE works for every key, as the configs'
  docstrings and the README tell users (the flags of qlhs_jax.main, parsed in a
  subprocess: ml_collections registers the override flags on absl's global FLAGS)."""
  values = {"d_impl": "shifted_t", "remat": "dots", "hidden_layout": "s_major",
            "fuse_d_bn": "xla", "block_max_width": 64, "pin_hidden_layout": True,
            "widths": [8, 16],
            "depths": [1, 1], "stem": "small", "stem_pool": "autodiff",
            "stem_pad_channels": 0, "stem_conv": "direct", "expansion": 6,
            "weight_sharing": False, "activation": "relu", "placement": "all",
            "eq6_c_norm": False}
  assert set(values) == set(qconfig.base_config().model_overrides)
  code = ("import json, sys; from absl import flags; import qlhs_jax.main; "
          "flags.FLAGS(sys.argv); from qlhs_jax import config as q; "
          "print(json.dumps(q.model_overrides(flags.FLAGS.config)))")
  args = [f"--config={REPO}/configs/eq3.py", "--workdir=unused"] + [
      f"--config.model_overrides.{k}={tuple(v) if isinstance(v, list) else v}".replace(
          " ", "") for k, v in values.items()]
  out = subprocess.run([sys.executable, "-c", code] + args, capture_output=True,
                       text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) == values


def test_main_cli_and_sigterm(tmp_path):
  """The CLI trains; SIGTERM saves at the next step boundary and exits 0; a rerun
  resumes from there."""
  wd = str(tmp_path / "cli")
  cmd = [sys.executable, "-m", "qlhs_jax.main", f"--config={REPO}/configs/quickstart.py",
         f"--workdir={wd}", "--config.data.image_size=16", "--config.epochs=3",
         "--config.model_overrides.widths=(4,8)", "--config.model_overrides.depths=(1,1)",
         "--config.progress_bar=False", "--config.log_every_steps=1"]
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}
  proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics = os.path.join(wd, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and '"train"' in open(metrics).read():
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.stdout.read()
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, out
  assert "'status': 'preempted'" in out
  events = [json.loads(l) for l in open(metrics)]
  stopped = [e for e in events if e.get("event") == "sigterm"]
  assert len(stopped) == 1
  step = stopped[0]["step"]
  assert ckpt_lib.RunCheckpoints(wd, read_only=True).latest_step() == step
  rerun = subprocess.run(cmd + [f"--config.stop_after_steps={step + 2}"], cwd=str(tmp_path),
                         env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert f"'step': {step + 2}" in rerun.stdout and "'status': 'stopped'" in rerun.stdout


def test_a_run_saved_before_a_config_key_existed_resumes(tmp_path):
  """A workdir whose config.json predates a config key (here the model_overrides
  placeholder stem_pool) is the same config while the key stays unset; setting it is a
  change the guard names."""
  c = tiny_config()
  wd = str(tmp_path / "run")
  ckpt_lib.save_or_check_config(wd, c)
  path = os.path.join(wd, "config.json")
  saved = json.load(open(path))
  assert "model_overrides.stem_pool" in saved and saved["model_overrides.stem_pool"] is None
  del saved["model_overrides.stem_pool"]  # as written before the key existed
  json.dump(saved, open(path, "w"))
  ckpt_lib.save_or_check_config(wd, c)  # no error: absent and unset agree
  c.model_overrides.stem_pool = "autodiff"
  with pytest.raises(ValueError, match="model_overrides.stem_pool: saved '<absent>', now "
                                       "'autodiff'"):
    ckpt_lib.save_or_check_config(wd, c)


def _saved_before(key, tmp_path):
  """A workdir whose config.json lacks ``key``, as written before the key existed, and
  the tiny config it was saved from."""
  c = tiny_config()
  wd = str(tmp_path / "run")
  ckpt_lib.save_or_check_config(wd, c)
  path = os.path.join(wd, "config.json")
  saved = json.load(open(path))
  del saved[key]
  json.dump(saved, open(path, "w"))
  return c, wd


def test_a_run_saved_before_device_normalize_resumes_with_host_normalisation(tmp_path):
  """Such a run normalised its train images on the host: it resumes bit-exactly with
  device_normalize=False, and the guard names the key when it is left True."""
  c, wd = _saved_before("data.device_normalize", tmp_path)
  assert c.data.device_normalize  # the training configs' default
  with pytest.raises(ValueError, match="data.device_normalize: saved False, now True"):
    ckpt_lib.save_or_check_config(wd, c)
  assert ckpt_lib.load_config(wd).data.device_normalize is False
  c.data.device_normalize = False
  ckpt_lib.save_or_check_config(wd, c)


def test_a_run_saved_before_device_randaugment_resumes_as_it_was(tmp_path):
  """RandAugment ran on the host then, as it does with the key's default, False: such a
  run resumes unchanged, and the guard names the key when it is turned on."""
  c, wd = _saved_before("data.device_randaugment", tmp_path)
  assert c.data.device_randaugment is False
  ckpt_lib.save_or_check_config(wd, c)
  assert ckpt_lib.load_config(wd).data.device_randaugment is False
  c.data.device_randaugment = True
  with pytest.raises(ValueError, match="data.device_randaugment: saved False, now True"):
    ckpt_lib.save_or_check_config(wd, c)


def test_a_run_saved_before_erase_noise_resumes_exactly_with_threefry(tmp_path):
  """Its erased boxes' fills came from jax.random: the guard names the key against the
  new default, and the run resumes with erase_noise='threefry'."""
  c, wd = _saved_before("data.erase_noise", tmp_path)
  assert c.data.erase_noise == "hash"
  with pytest.raises(ValueError, match="data.erase_noise: saved 'threefry', now 'hash'"):
    ckpt_lib.save_or_check_config(wd, c)
  assert ckpt_lib.load_config(wd).data.erase_noise == "threefry"
  c.data.erase_noise = "threefry"
  ckpt_lib.save_or_check_config(wd, c)


def test_the_dot_forms_option_trains_the_plain_paths_network(tmp_path, monkeypatch):
  """configs/eq3.py's ``,dot_forms`` trains through the stacked kernels (interpreted
  here; fuse_d_bn="xla", since "auto" is the plain path on a CPU): pass 4 makes c and dp
  and sums C's and A's gradients, the product makes c and applies A (p never stored).
  Over three steps in float32 at
  the peak learning rate, each weight's change is the plain autodiff path's (an
  independent computation) to float32 order."""
  from qlhs_jax.kernels import stencil
  from qlhs_jax.models.qlhs import QLHSBlock
  sys.path.insert(0, REPO)
  try:
    from configs import eq3
  finally:
    sys.path.remove(REPO)
  seen = set()
  elementwise = stencil._elementwise
  signature = inspect.signature(elementwise)

  def spy(*args, **kw):
    a = signature.bind(*args, **kw)
    a.apply_defaults()
    a = a.arguments
    seen.add((a["name"], a["dot"], a["cw"] is not None, a["aw"] is not None, a["w_grads"]))
    return elementwise(*args, **kw)
  monkeypatch.setattr(stencil, "_elementwise", spy)
  product_a = stencil.product_a
  monkeypatch.setattr(stencil, "product_a", lambda *a, **k: seen.add(("product_a",)) or
                      product_a(*a, **k))
  # BN_out's scales start at 1, not 0 (the recipe's zero init), for both runs: at 0
  # the hidden path gets gradients of the size of the first steps' scales, ~1e-3, and
  # its weights move by a few float32 roundings, too little to tell a wrong gradient.
  norm = QLHSBlock._norm
  monkeypatch.setattr(QLHSBlock, "_norm",
                      lambda self, x, name, zero_init=False: norm(self, x, name))

  def run(arg, fuse):
    c = eq3.get_config(arg)
    c.model_overrides.fuse_d_bn = fuse
    c.model_overrides.widths = (16, 32)  # the dot forms' blocks take 16 channels
    c.model_overrides.depths = (1, 1)
    c.data.image_size, c.batch_size, c.stop_after_steps = 16, 8, 3
    c.warmup_epochs = 0  # the peak rate, not the warmup's 1e-5
    c.progress_bar = False
    wd = str(tmp_path / fuse)
    assert train.train_and_evaluate(c, wd)["step"] == 3
    return [ckpt_lib.load_run(wd, which=w).variables for w in ("0", "latest")]

  stacked = run("softball_ds,dot_forms,quickstart", "xla")
  assert seen == {("product_a",), ("dx", True, True, True, True)}, seen
  plain = run("softball_ds,quickstart", "none")
  assert leaves_equal(stacked[0], plain[0])  # the same initial weights
  paths = jax.tree_util.tree_leaves_with_path(plain[1])
  for (path, b), a, a0 in zip(paths, jax.tree.leaves(stacked[1]), jax.tree.leaves(plain[0])):
    moved_a = np.asarray(a, np.float64) - np.asarray(a0, np.float64)
    moved_b = np.asarray(b, np.float64) - np.asarray(a0, np.float64)
    scale = np.abs(moved_b).max()
    assert scale > 1e-4, path  # every weight moved (BatchNorm's statistics too)
    np.testing.assert_allclose(moved_a, moved_b, rtol=0, atol=1e-3 * scale,
                               err_msg=jax.tree_util.keystr(path))
