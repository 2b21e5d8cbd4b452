"""The throughput harness runs the real train step and reports a ratio."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from qlhs_jax.benchmarks import step

TINY = ["widths=[8,16]", "depths=[1,1]", "stem=\"small\""]


def test_harness_vs_baseline(tmp_path):
  record = tmp_path / "results.jsonl"
  cmd = [sys.executable, "-m", "qlhs_jax.benchmarks.step", "--model", "eq3_softball_ds",
         "--vs", "resnet50", "--batch", "8", "--size", "16", "--steps", "2", "--warmup", "1",
         "--dtype", "float32", "--record", str(record)]
  for kv in TINY:
    cmd += ["--set", kv, "--vs-set", kv]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
  assert "ratio eq3_softball_ds / resnet50" in out
  rows = [json.loads(l) for l in record.read_text().splitlines()]
  assert [r["model"] for r in rows] == ["eq3_softball_ds", "resnet50"]
  assert rows[0]["train_img_s"] > 0 and rows[0]["eval_img_s"] > 0
  ratio = rows[0]["train_ratio_vs"]["resnet50"]
  assert abs(ratio - rows[0]["train_img_s"] / rows[1]["train_img_s"]) < 1e-9


def test_measure_in_process_on_8_devices(tmp_path, monkeypatch):
  # conftest gives 8 CPU devices: the step runs data-parallel with per-replica BN.
  # The kernels' environment settings that change this model's kernels (here the du
  # form of fuse_d_bn="xla", not the tiling of "block") are recorded and tabled.
  monkeypatch.setenv("QLHS_DU_FORM", "gather")
  monkeypatch.setenv("QLHS_BLOCK_TILING", "32,4")
  r = step.measure("eq3_softball_ds", 8, 16, 1, 1, "float32",
                   {"widths": [8, 16], "depths": [1, 1], "stem": "small",
                    "fuse_d_bn": "xla"})
  assert r["devices"] == 8 and r["train_img_s"] > 0
  assert r["env"] == {"QLHS_DU_FORM": "gather"}
  from qlhs_jax.benchmarks import table
  path = tmp_path / "r.jsonl"
  path.write_text(json.dumps(r) + "\n")
  assert ("stem=small, widths=[8, 16], QLHS_DU_FORM=gather, grouped writes |"
          in table.table(str(path)))


def test_uint8_input_is_normalised_and_erased_in_the_step(tmp_path):
  """--input uint8 times the step training runs with device_normalize: its batch is
  the pipeline's (uint8 images, boxes, seeds), the record and the table say so."""
  batch = step.synthetic_batch(64, 16, "uint8")
  assert batch["image"].dtype == np.uint8 and batch["erase"].shape == (64, 3, 4)
  erased = batch["erase"][:, :, 2] > 0
  assert 0.2 < erased.any(1).mean() < 0.6  # the recipe's 40% of the images
  top, left, h, w = np.moveaxis(batch["erase"], -1, 0)
  assert ((top + h <= 16) & (left + w <= 16)).all()
  r = step.measure("eq3_softball_ds", 8, 16, 1, 1, "float32",
                   {"widths": [8, 16], "depths": [1, 1], "stem": "small"}, input="uint8")
  assert r["input"] == "uint8" and r["train_img_s"] > 0 and np.isfinite(r["final_loss"])
  from qlhs_jax.benchmarks import table
  path = tmp_path / "r.jsonl"
  path.write_text(json.dumps(r) + "\n")
  assert ("stem=small, widths=[8, 16], input=uint8, grouped writes |"
          in table.table(str(path)))


def test_state_writes_per_leaf_is_timed_and_recorded(tmp_path):
  """--state-writes per_leaf times the step of config.group_state_writes=False (the old
  state donated); the record says which, and the table marks the grouped default."""
  tiny = {"widths": [8, 16], "depths": [1, 1], "stem": "small"}
  rows = [step.measure("eq3_softball_ds", 8, 16, 1, 1, "float32", tiny, state_writes=w)
          for w in ("per_leaf", "grouped")]
  assert [r["state_writes"] for r in rows] == ["per_leaf", "grouped"]
  assert all(np.isfinite(r["final_loss"]) for r in rows)
  from qlhs_jax.benchmarks import table
  path = tmp_path / "r.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  lines = [l for l in table.table(str(path)).splitlines() if "widths=[8, 16]" in l]
  assert ["grouped writes" in l for l in lines] == [False, True]
  # A GPU record with multiply-add contraction (config.xla_fma) is marked; CPU records
  # have no field.
  assert "xla_fma" not in rows[1]
  path.write_text("".join(json.dumps(dict(r, xla_fma=f)) + "\n"
                          for r, f in zip(rows, (False, True))))
  lines = [l for l in table.table(str(path)).splitlines() if "widths=[8, 16]" in l]
  assert [l.count(", fma |") for l in lines] == [0, 1]
  with pytest.raises(SystemExit, match="--state-writes 'leaf'.*per_leaf"):
    step.measure("eq3_softball_ds", 8, 16, 1, 1, "float32", tiny, state_writes="leaf")


def test_randaugment_input_applies_the_ops_in_the_step():
  """--input uint8_randaugment: two op slots per image, about half of them skipped, every
  device op among them; the step runs with them and the record says so."""
  from qlhs_jax import device_augment
  batch = step.synthetic_batch(256, 16, "uint8_randaugment")
  assert batch["ra_op"].shape == batch["ra_arg"].shape == (256, 2)
  assert 0.4 < (batch["ra_op"] == -1).mean() < 0.6
  assert set(batch["ra_op"][batch["ra_op"] >= 0]) == set(range(len(device_augment.OPS)))
  r = step.measure("eq3_softball_ds", 8, 16, 1, 1, "float32",
                   {"widths": [8, 16], "depths": [1, 1], "stem": "small"},
                   input="uint8_randaugment")
  assert r["input"] == "uint8_randaugment" and np.isfinite(r["final_loss"])


def test_the_harness_erases_as_the_recipe():
  """The harness spells the recipe's input out (no grain on the GPU machine)."""
  from qlhs_jax import data
  c = data.default_config()
  for key in ("mean", "std", "reprob", "remode", "recount", "randaugment", "erase_noise"):
    assert tuple(np.atleast_1d(getattr(step.RECIPE_INPUT, key))) == tuple(
        np.atleast_1d(c[key])), key


def test_block_fusion_on_8_devices_is_refused():
  # eq3_block's kernels run on one device (the others run per device, under shard_map).
  with pytest.raises(ValueError, match="runs on one device; this mesh has 8.*'xla'"):
    step.measure("eq3_softball_ds", 8, 16, 1, 1, "float32",
                 {"widths": [16, 32], "depths": [1, 1], "stem": "small",
                  "fuse_d_bn": "block"})


def test_unknown_model_fails_before_compiling():
  p = subprocess.run([sys.executable, "-m", "qlhs_jax.benchmarks.step", "--model", "eq9"],
                     capture_output=True, text=True)
  assert p.returncode != 0 and "unknown model 'eq9'" in p.stderr


def _fake_child(tmp_path, body):
  script = tmp_path / "child.py"
  script.write_text("import json, sys, time\n" + body)
  return [sys.executable, str(script)]


def test_a_child_that_hangs_after_its_record_is_stopped_and_the_record_kept(tmp_path,
                                                                             capsys):
  """The --vs parent takes the record a child prints before profiling; a profile that
  then hangs is stopped after the wait, so the next model gets the device."""
  cmd = _fake_child(tmp_path, 'print("compiling...")\n'
                    'print(json.dumps({"model": "m", "train_img_s": 5.0}), flush=True)\n'
                    'time.sleep(120)\n')
  t0 = time.perf_counter()
  assert step.run_child(cmd, wait_s=1) == {"model": "m", "train_img_s": 5.0}
  assert time.perf_counter() - t0 < 30
  assert "ran past 1 s and was stopped; the timing stands" in capsys.readouterr().err


def test_a_vs_row_prints_each_model_as_soon_as_it_is_timed(tmp_path, monkeypatch,
                                                         capsys):
  """The first model's figures and record reach the log before the second model runs,
  so a row stopped while the second runs loses neither; the results file and the ratio
  come when both are done."""
  seen = []

  def child(args, name, sets, profile=False):
    seen.append(capsys.readouterr().out)  # what was printed before this child ran
    return {"model": name, "train_img_s": 8.0 if name == "a" else 4.0, "eval_img_s": 2.0,
            "peak_mem_gb": None, "overrides": {}, "device": "cpu:cpu"}
  monkeypatch.setattr(step, "_child", child)
  monkeypatch.setattr("qlhs_jax.models.registry.info", lambda name: None)
  record = tmp_path / "r.jsonl"
  step.main(["--model", "a", "--vs", "b", "--record", str(record)])
  assert seen[0] == "" and "timed a: train 8.0 img/s, eval 2.0 img/s, peak - GB" in seen[1]
  assert json.loads(seen[1].split("record ", 1)[1])["train_img_s"] == 8.0
  out = capsys.readouterr().out
  assert "timed b: train 4.0" in out and "ratio a / b: train 2.000" in out
  rows = [json.loads(l) for l in record.read_text().splitlines()]
  assert [r["model"] for r in rows] == ["a", "b"] and rows[0]["train_ratio_vs"] == {"b": 2.0}


def test_a_child_that_crashes_after_its_record_keeps_it(tmp_path, capsys):
  cmd = _fake_child(tmp_path, 'print(json.dumps({"model": "m", "train_img_s": 5.0}))\n'
                    'sys.exit(3)\n')
  assert step.run_child(cmd)["train_img_s"] == 5.0
  assert "exited with 3 after its timing" in capsys.readouterr().err


def test_a_child_that_fails_before_its_record_raises(tmp_path):
  cmd = _fake_child(tmp_path, 'print("no record")\nsys.exit(2)\n')
  with pytest.raises(subprocess.CalledProcessError):
    step.run_child(cmd)


def test_the_record_goes_out_before_the_profile(tmp_path, monkeypatch):
  """measure() hands the record to on_record (the child's print, the parent's table and
  results file) before it traces the profile steps."""
  order = []
  monkeypatch.setattr(step, "_profile", lambda *a, **k: order.append("profile"))
  r = step.measure("eq3_softball_ds", 8, 16, 1, 1, "float32",
                   {"widths": [8, 16], "depths": [1, 1], "stem": "small"},
                   profile_dir=str(tmp_path), on_record=lambda rec: order.append(rec))
  assert order == [r, "profile"]


def test_the_profile_compiles_the_step_again_without_command_buffers(tmp_path,
                                                                     monkeypatch):
  """The timing compiles with XLA's defaults; the profile compiles the step again with
  PROFILE_COMPILER_OPTIONS (command buffers off) and attributes its kernels from that
  executable's HLO."""
  import jax
  calls, seen = [], {}
  real = jax.stages.Lowered.compile

  def spy(self, compiler_options=None, **kw):
    calls.append(compiler_options)
    return real(self, compiler_options, **kw)
  monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
  monkeypatch.setattr(step, "_profile", lambda d, n, run, hlo, rec: seen.update(
      loss=float(run()), hlo=hlo))
  step.measure("eq3_softball_ds", 8, 16, 1, 1, "float32",
               {"widths": [8, 16], "depths": [1, 1], "stem": "small"},
               profile_dir=str(tmp_path))
  # train step, eval forward, then the profiled train step
  assert calls == [None, None, step.PROFILE_COMPILER_OPTIONS]
  assert step.PROFILE_COMPILER_OPTIONS == {"xla_gpu_enable_command_buffer": ""}
  assert seen["loss"] > 0 and "ENTRY" in seen["hlo"]


def test_only_the_model_is_profiled_in_a_vs_row(monkeypatch):
  cmds = []

  def child(cmd):
    cmds.append(cmd)
    return {"model": cmd[cmd.index("--model") + 1], "train_img_s": 2.0, "eval_img_s": 1.0,
            "peak_mem_gb": None, "overrides": {}, "device": "cpu:cpu"}
  monkeypatch.setattr(step, "run_child", child)
  monkeypatch.setattr("qlhs_jax.models.registry.info", lambda name: None)
  step.main(["--model", "a", "--vs", "b", "--profile-dir", "/tmp/p", "--hlo-dir", "/tmp/h"])
  assert [c[c.index("--model") + 1] for c in cmds] == ["a", "b"]
  assert "--profile-dir" in cmds[0] and "--profile-dir" not in cmds[1]
  assert all("--hlo-dir" in c for c in cmds)


def test_every_kernel_setting_can_reach_a_record():
  """Each variable of ``config.kernels`` (``kernels.settings``) is one the records carry
  where it changes the model's kernels: a new setting missing here would leave its
  rows indistinguishable from the default's (QLHS_C_FORM was, for a first compile)."""
  from qlhs_jax.benchmarks.step import KERNEL_ENV
  from qlhs_jax.kernels import settings
  assert set(settings.VARIABLES.values()) <= set(KERNEL_ENV), (
      set(settings.VARIABLES.values()) - set(KERNEL_ENV))


def test_records_carry_the_kernel_variables_that_change_their_model(monkeypatch):
  """A record names the tilings and forms that change its model's kernels, and no other:
  the statistics' form changes "xla" and "block", the du form also "pallas" and
  shifted_t, neither the plain path."""
  from qlhs_jax.benchmarks.step import kernel_env_of
  monkeypatch.setenv("QLHS_STATS_FORM", "pallas")
  monkeypatch.setenv("QLHS_DU_FORM", "pallas")
  monkeypatch.delenv("QLHS_SUMS_FORM", raising=False)
  monkeypatch.delenv("QLHS_STENCIL_TILING", raising=False)
  both = {"QLHS_STATS_FORM": "pallas", "QLHS_DU_FORM": "pallas"}
  assert kernel_env_of({"fuse_d_bn": "xla"}) == both
  assert kernel_env_of({"fuse_d_bn": "block", "block_max_width": 0}) == both
  assert kernel_env_of({"fuse_d_bn": "pallas"}) == {"QLHS_DU_FORM": "pallas"}
  assert kernel_env_of({"d_impl": "shifted_t"}) == {"QLHS_DU_FORM": "pallas"}
  assert kernel_env_of({}) == {} and kernel_env_of({"d_impl": "grouped"}) == {}
  monkeypatch.setenv("QLHS_STENCIL_ROWS", "du")  # the row walks: where the kernels run
  assert kernel_env_of({"fuse_d_bn": "xla"}) == dict(both, QLHS_STENCIL_ROWS="du")
  assert kernel_env_of({}) == {}
  monkeypatch.delenv("QLHS_STENCIL_ROWS")
  # Left to "auto", on this CPU: XLA's forms, nothing to record (as in the records
  # before auto). Where auto picks the kernels (one NVIDIA GPU; benchmarks.aot compiling
  # for one: QLHS_PALLAS_INTERPRET=0), "auto:pallas", for the forms the model uses.
  for var in ("QLHS_STATS_FORM", "QLHS_DU_FORM", "QLHS_PALLAS_INTERPRET"):
    monkeypatch.delenv(var, raising=False)
  assert kernel_env_of({"fuse_d_bn": "xla"}) == {}
  monkeypatch.setenv("QLHS_PALLAS_INTERPRET", "0")
  auto = "auto:pallas"
  # and the taps from a padded copy of u (QLHS_D_TAPS), which only "xla" reads so
  assert kernel_env_of({"fuse_d_bn": "xla"}) == {
      "QLHS_STATS_FORM": auto, "QLHS_SUMS_FORM": auto, "QLHS_DU_FORM": auto,
      "QLHS_D_TAPS": "auto:copy"}
  assert kernel_env_of({"fuse_d_bn": "pallas"}) == {"QLHS_DU_FORM": auto}
  monkeypatch.setenv("QLHS_DU_FORM", "auto")  # named: the same as unset
  assert kernel_env_of({"d_impl": "shifted_t"}) == {"QLHS_DU_FORM": auto}
  monkeypatch.setenv("QLHS_DU_FORM", "gather")
  assert kernel_env_of({"d_impl": "shifted_t"}) == {"QLHS_DU_FORM": "gather"}
  assert kernel_env_of({}) == {}
  # The model's expansion decides as it does in the model: nows_x6's 6 is not a power of
  # two, so auto is the plain path there (nothing to record), and "xla" takes the
  # kernels only for the statistics, which read u alone.
  monkeypatch.delenv("QLHS_DU_FORM")
  from qlhs_jax.models import create
  x6, x4 = create("eq3_nows_x6_softball_ds"), create("eq3_softball_ds")
  assert (x6.expansion, x4.expansion) == (6, 4)
  assert kernel_env_of({"fuse_d_bn": "auto"}, x6) == {}
  assert kernel_env_of({"fuse_d_bn": "xla"}, x6) == {"QLHS_STATS_FORM": auto,
                                                      "QLHS_D_TAPS": "auto:copy"}
  assert kernel_env_of({"fuse_d_bn": "auto"}, x4) == {
      "QLHS_STATS_FORM": auto, "QLHS_SUMS_FORM": auto, "QLHS_DU_FORM": auto,
      "QLHS_D_TAPS": "auto:copy"}
  # the forward product and pass 4 as kernels too: no XLA pass reads u's taps, no copy
  monkeypatch.setenv("QLHS_PRODUCT_FORM", "pallas")
  assert kernel_env_of({"fuse_d_bn": "auto"}, x4) == {
      "QLHS_STATS_FORM": auto, "QLHS_SUMS_FORM": auto, "QLHS_DU_FORM": auto,
      "QLHS_PRODUCT_FORM": "pallas"}
  monkeypatch.setenv("QLHS_SUMS_FORM", "xla")  # XLA's sums read them in the backward
  assert kernel_env_of({"fuse_d_bn": "auto"}, x4)["QLHS_D_TAPS"] == "auto:copy"
  monkeypatch.delenv("QLHS_PRODUCT_FORM")
  monkeypatch.delenv("QLHS_SUMS_FORM")
  monkeypatch.setenv("QLHS_D_TAPS", "pad")  # named: recorded as set
  assert kernel_env_of({"fuse_d_bn": "auto"}, x4)["QLHS_D_TAPS"] == "pad"
  monkeypatch.setenv("QLHS_C_FORM", "kernels")  # c made in the kernels: "xla"'s only
  assert kernel_env_of({"fuse_d_bn": "auto"}, x4)["QLHS_C_FORM"] == "kernels"
  assert "QLHS_C_FORM" not in kernel_env_of({"fuse_d_bn": "pallas"})
  monkeypatch.delenv("QLHS_C_FORM")
  assert kernel_env_of({"fuse_d_bn": "pallas"}) == {"QLHS_DU_FORM": auto}
