"""The Pallas kernels' time budget: per-class fits, the projection and the budget against
hand-computed figures, the baseline's choice, and the errors that name their fix."""

import json

import pytest

from qlhs_jax.benchmarks import budget, hlo_bytes


def _hlo(kernels):
  """An HLO module of top-level kernels ``(name, kind, n)``: each reads one f32[n] and
  writes one (8n bytes moved)."""
  decl = {"loop": 'fusion({a}), kind=kLoop, calls=%f',
          "reduce": 'fusion({a}), kind=kInput, calls=%r',
          "gemm": 'fusion({a}), kind=kCustom, calls=%gemm_fusion_dot',
          "pallas": 'custom-call({a}), custom_call_target="__gpu$xla.gpu.triton"',
          "cudnn": 'custom-call({a}), custom_call_target="__cudnn$convForward"',
          "cublas": 'custom-call({a}), custom_call_target="__cublas$gemm"',
          "copy": 'copy({a})'}
  lines = ["HloModule m", "ENTRY %main (p: f32[8]) -> f32[8] {",
           "  %p = f32[8]{0} parameter(0)"]
  for name, kind, n in kernels:
    op = decl[kind].format(a=f"f32[{n}]{{0}} %p")
    meta = 'metadata={op_name="jit(f)/stage1_block0/x"}'
    lines.append(f"  %{name} = f32[{n}]{{0}} {op}, {meta}")
  return "\n".join(lines + ["}"]) + "\n"


# The profiled step: five loops of 2-32 MB at t = 2 us + 1 us per 1e6 bytes (1 TB/s), two
# small loops (under budget.SMALL_BYTES) at 1 and 2 us, two Pallas calls at 10 us + 1 us
# per 5e5 bytes (0.5 TB/s), one cuDNN call (too few for an intercept).
PROFILED = [(f"loop{i}", "loop", n) for i, n in enumerate((250_000, 500_000, 1_000_000,
                                                             2_000_000, 4_000_000))]
PROFILED += [("tiny0", "loop", 1000), ("tiny1", "loop", 2000),
             ("pal0", "pallas", 250_000), ("pal1", "pallas", 500_000),
             ("conv", "cudnn", 1_000_000)]


def _times():
  us = {}
  for name, kind, n in PROFILED:
    b = 8 * n
    us[name] = {"loop": 2 + b / 1e6, "pallas": 10 + b / 5e5, "cudnn": b / 2e6}[kind]
  us["tiny0"], us["tiny1"] = 1.0, 2.0
  return us


def _rows(kernels):
  return hlo_bytes.analyse(_hlo(kernels))


def test_each_class_fit_recovers_its_intercept_and_rate():
  fits = budget.fit(_rows(PROFILED), _times())
  assert fits["element-wise loop"]["t0_us"] == pytest.approx(2.0, abs=1e-9)
  assert fits["element-wise loop"]["us_per_byte"] == pytest.approx(1e-6)
  assert fits["element-wise loop"]["kernels"] == 7
  assert fits["element-wise loop"]["small_us"] == pytest.approx(1.5)
  # two Pallas calls and one convolution: fewer than MIN_FIT, through the origin
  pal_bytes = 8 * 750_000
  assert fits["pallas"]["t0_us"] == 0.0 and fits["pallas"]["small_us"] is None
  assert fits["pallas"]["us_per_byte"] == pytest.approx((20 + pal_bytes / 5e5) / pal_bytes)
  assert fits["convolution (cuDNN)"]["us_per_byte"] == pytest.approx(1 / 2e6)


def test_a_small_kernel_takes_its_class_mean_a_large_one_the_line():
  """Under budget.SMALL_BYTES a loop takes the small profiled loops' mean (1.5 us), not
  the line through the large ones (2 us + 8 KB at 1 TB/s); a small kernel of a class
  without small profiled kernels takes the class's line."""
  fits = budget.fit(_rows(PROFILED), _times())
  step = budget.project(_rows([("a", "loop", 1000), ("b", "loop", 500_000),
                               ("c", "cudnn", 1000)]), fits)
  assert step["element-wise loop"]["ms"] == pytest.approx((1.5 + 2 + 4) / 1e3)
  assert step["convolution (cuDNN)"]["ms"] == pytest.approx(8000 / 2e6 / 1e3)


def test_a_negative_intercept_refits_through_the_origin():
  """Five reductions at t = 1.3 us a MB - 0.8 us: no launch takes negative time, so the
  class is fitted through the origin, at its total time over its total bytes."""
  kernels = [(f"r{i}", "reduce", 250_000 * (i + 1)) for i in range(5)]  # 2..10 MB
  us = {f"r{i}": 1.3 * (i + 1) - 0.8 for i in range(5)}
  f = budget.fit(_rows(kernels), us)["reduction"]
  assert f["t0_us"] == 0.0
  assert f["us_per_byte"] == pytest.approx(sum(us.values()) / 30e6)


def test_matmuls_of_either_library_and_copies_share_a_fit():
  """A deviceless compile may place a matmul in a Triton GEMM fusion where the device
  chose cuBLAS, and XLA emits copies as loops: the step's cuBLAS call is projected with
  the profile's GEMM fusions, its copy with the profile's loops."""
  gemms = [(f"g{i}", "gemm", 250_000 * (i + 1)) for i in range(5)]
  us = {f"g{i}": 5 + 2 * (i + 1) for i in range(5)}  # 5 us + 2 us a 2 MB
  fits = budget.fit(_rows(gemms + PROFILED), {**us, **_times()})
  step = budget.project(_rows([("m", "cublas", 250_000), ("c", "copy", 1_000_000)]), fits)
  assert step["matmul"]["ms"] == pytest.approx((5 + 2) / 1e3)
  assert step["element-wise loop"]["ms"] == pytest.approx((2 + 8) / 1e3)


def test_the_budget_is_the_target_less_the_other_kernels_and_the_gaps():
  profile = {"train_step_ms": sum(_times().values()) / 1e3 + 10 * 3e-3,  # 3 us a launch
             "us_per_step": _times(), "device": "gpu:NVIDIA H200"}
  # the step: two loops (4 MB and 8 MB), one convolution (8 MB), three Pallas calls (24 MB)
  step = [("l0", "loop", 500_000), ("l1", "loop", 1_000_000), ("c", "cudnn", 1_000_000),
          ("q0", "pallas", 1_000_000), ("q1", "pallas", 1_000_000),
          ("q2", "pallas", 1_000_000)]
  b = budget.budget(_rows(step), profile, _rows(PROFILED), baseline_ms=0.3, ratio=1.2)
  assert b["gap_us"] == pytest.approx(3.0)
  assert b["launches"] == 6
  loops = (2 + 4) + (2 + 8)  # us
  conv = 8e6 / 2e6
  assert b["other_ms"] == pytest.approx((loops + conv) / 1e3)
  assert b["gaps_ms"] == pytest.approx(6 * 3e-3)
  assert b["target_ms"] == pytest.approx(0.25)
  left = 0.25 - (loops + conv) / 1e3 - 0.018
  assert b["pallas_ms"] == pytest.approx(left)
  assert b["pallas_gb"] == pytest.approx(0.024)
  assert b["pallas_tbps"] == pytest.approx(0.024 / left)
  # a copy of 24 MB at the H200's 4.3 TB/s; the profiled Pallas calls: 6 MB in 32 us
  assert b["pallas_copies"] == pytest.approx(left / (0.024e9 / 4.3e12 * 1e3))
  assert b["profiled_copies"] == pytest.approx(32e-3 / (6e6 / 4.3e12 * 1e3))
  unknown = budget.budget(_rows(step), {**profile, "device": "gpu:X"}, _rows(PROFILED),
                          baseline_ms=0.3, ratio=1.2)
  assert unknown["pallas_copies"] is None and unknown["pallas_ms"] == b["pallas_ms"]
  per_byte = budget.fit(_rows(PROFILED), _times())["pallas"]["us_per_byte"]
  at = b["at_profile"]
  assert at["pallas_ms"] == pytest.approx(3 * 8e6 * per_byte / 1e3)
  assert at["step_ms"] == pytest.approx((loops + conv) / 1e3 + 0.018 + at["pallas_ms"])
  assert at["ratio"] == pytest.approx(0.3 / at["step_ms"])


def test_the_profiled_step_projects_to_its_measured_time():
  """Least squares with an intercept (or through the origin) keeps each class's sum, so
  the profiled H200 step, projected from its own profile with its Pallas kernels at their
  own fit, is its measured 33.67 ms: the bytes, classes and gaps add up."""
  with open(budget.PROFILE) as f:
    profile = [json.loads(line) for line in f][budget.PROFILE_LINE]
  rows = hlo_bytes.analyse(hlo_bytes.read_hlo(budget.PROFILE_HLO))
  b = budget.budget(rows, profile, rows, baseline_ms=34.65, ratio=1.2)
  assert b["at_profile"]["step_ms"] == pytest.approx(profile["train_step_ms"], rel=1e-9)
  assert profile["train_step_ms"] == pytest.approx(33.67, abs=0.01)
  assert b["launches"] == 845


def test_the_baseline_is_the_fastest_resnet50_of_the_device(tmp_path):
  path = tmp_path / "results.jsonl"
  base = {"model": "resnet50", "device": "gpu:H", "batch": 256, "size": 224,
          "dtype": "bfloat16"}
  records = [{**base, "train_step_ms": 36.0},
             {**base, "train_step_ms": 34.0, "commit": "a"},
             {**base, "train_step_ms": 30.0, "batch": 128},
             {**base, "train_step_ms": 20.0, "device": "gpu:other"},
             {**base, "model": "eq3_softball_ds", "train_step_ms": 10.0},
             {**base, "kind": "deviceless"}]
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
  assert budget.baseline(str(path), "gpu:H")["commit"] == "a"
  with pytest.raises(SystemExit, match="no ResNet50 train step measured on gpu:none.*"
                                       "--baseline-ms"):
    budget.baseline(str(path), "gpu:none")


def test_the_committed_baseline_is_the_h200s_space_to_depth_resnet50():
  with open(budget.PROFILE) as f:
    device = [json.loads(line) for line in f][budget.PROFILE_LINE]["device"]
  r = budget.baseline(budget.RESULTS, device)
  assert r["train_step_ms"] == pytest.approx(34.65, abs=0.01)
  assert r["overrides"] == {"stem_conv": "space_to_depth"}


def test_errors_name_what_is_missing():
  profile = {"train_step_ms": 1.0, "us_per_step": _times()}
  with pytest.raises(SystemExit, match="no kernels of class reduction"):
    budget.budget(_rows([("r", "reduce", 1000)]), profile, _rows(PROFILED), 1.0, 1.2)
  with pytest.raises(SystemExit, match="names none of its HLO's instructions"):
    budget.budget(_rows(PROFILED), {"train_step_ms": 1.0, "us_per_step": {"x": 1.0}},
                  _rows(PROFILED), 1.0, 1.2)


def test_the_command_line_on_the_committed_profile(tmp_path, capsys):
  step = tmp_path / "step.hlo.txt"
  step.write_text(_hlo([("l0", "loop", 1_000_000), ("q0", "pallas", 1_000_000)]))
  budget.main([str(step)])
  out = capsys.readouterr().out
  assert "target: ResNet50 34.65 ms" in out and "= 28.88 ms" in out
  assert "Pallas budget:" in out and "0.01 GB" in out
  with pytest.raises(SystemExit, match="--line 9: .* has 4 lines"):
    budget.main([str(step), "--line", "9"])
  with pytest.raises(SystemExit, match="nowhere.jsonl not found: .* give --profile"):
    budget.main([str(step), "--profile", str(tmp_path / "nowhere.jsonl")])


def test_the_pallas_bounds_sum_each_launchs_larger_bound():
  pallas = "custom-call __gpu$xla.gpu.triton"
  rows = [{"name": "a", "kind": pallas, "loop": 10, "trips": (5, 1), "floor_ms": 0.3,
           "copy_ms": 0.1, "latency_ms": 0.6},
          {"name": "b", "kind": pallas, "loop": 0, "trips": None, "floor_ms": 0.1,
           "copy_ms": 0.2, "latency_ms": 0.15},
          {"name": "c", "kind": "element-wise loop", "loop": 0, "trips": None,
           "floor_ms": 5.0, "copy_ms": 5.0, "latency_ms": 5.0}]
  b = budget.pallas_bounds(rows)
  # The model: the largest of each launch's three, 0.6 and 0.2.
  assert b == {"launches": 2, "floor_ms": pytest.approx(0.4),
               "copy_ms": pytest.approx(0.3), "bound_ms": pytest.approx(0.5),
               "latency_ms": pytest.approx(0.75), "model_ms": pytest.approx(0.8)}
  rows[0]["trips"] = None  # a loop counted once is no bound
  with pytest.raises(SystemExit, match="no trip counts for 1 Pallas launches .*--loops"):
    budget.pallas_bounds(rows)
  assert budget.pallas_bounds(rows[2:]) is None
