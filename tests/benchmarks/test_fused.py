"""benchmarks.fused: the agreement check can fail, the record feeds the README table."""

import json

import pytest

from qlhs_jax.benchmarks import fused, table
from qlhs_jax.kernels import d_bn_product as dbn

# Two shapes (stride 1 and 2) keep the interpret-mode run short.
SHAPES = [("stage1", 56, 64, 1, 3), ("stage2_block0", 56, 64, 2, 1)]
ARGS = ["--batch", "2", "--check-batch", "2", "--size-scale", "8", "--steps", "1",
        "--warmup", "0", "--interpret"]


def test_check_time_and_record(tmp_path, monkeypatch):
  monkeypatch.setattr(fused, "EQ3_SHAPES", SHAPES)
  record = tmp_path / "results.jsonl"
  assert fused.main(ARGS + ["--record", str(record)]) == 0
  r = json.loads(record.read_text())
  assert r["kind"] == "fused_op" and [s["shape"] for s in r["shapes"]] == ["stage1",
                                                                         "stage2_block0"]
  assert all(a[i] < 1e-4 for a in r["agreement"] for i in ("xla", "pallas"))
  assert r["network_ms"]["pallas"] == sum(s["blocks"] * s["ms"]["pallas"]
                                          for s in r["shapes"])
  # The byte count of the stage-1 shape at batch 256, by hand (NOTES.md): u 102.8 MB,
  # padded u 256*58*66*64*2 = 125.4 MB, hidden 411.0 MB: 2u + 5 u_pad + 9 hidden.
  want = (2 * 256 * 56 * 56 * 64 + 5 * 256 * 58 * 66 * 64 + 9 * 256 * 56 * 56 * 256) * 2
  assert abs(fused.pass_gbytes(256, 56, 64, 1) - want / 1e9) < 1e-9
  assert abs(fused.pass_gbytes(256, 56, 64, 1) - 4.53) < 0.01
  # The README table shows it beside a train-step record.
  step_record = {"date": "2026-11-27", "device": "gpu:X", "jax": "0", "model": "m",
                 "batch": 256, "size": 224, "train_img_s": 1.0, "eval_img_s": 2.0,
                 "peak_mem_gb": None}
  with open(record, "a") as f:
    f.write(json.dumps(step_record) + "\n")
  text = table.table(str(record))
  assert "| 2026-11-27 | gpu:X | 0 | m | - | 256 | 224 |" in text
  assert "| 4,8192,4,0,1 |" in text and "BN(D u) * c alone" in text  # the default tiling


def test_disagreement_fails(monkeypatch):
  """A wrong Pallas forward (p off by 1e-3 of its scale) makes the run exit with 1."""
  monkeypatch.setattr(fused, "EQ3_SHAPES", SHAPES[:1])
  apply = dbn._pallas_apply
  monkeypatch.setattr(dbn, "_pallas_apply", lambda *a: apply(*a) * 1.001)
  assert fused.main(ARGS) == 1


def test_a_failing_implementation_is_reported_and_the_others_timed(monkeypatch, capsys):
  """A kernel that fails (as one that does not compile on a GPU would) makes the run
  exit with 1, names the error, and still times "none" and "xla"."""
  monkeypatch.setattr(fused, "EQ3_SHAPES", SHAPES[:1])

  def broken(*a):
    raise RuntimeError("Triton compile failed")
  monkeypatch.setattr(dbn, "_pallas_stats", broken)
  assert fused.main(ARGS) == 1
  out = capsys.readouterr().out
  assert "pallas failed: RuntimeError: Triton compile failed" in out
  timing_rows = out.split("forward + backward, ms")[1].splitlines()
  row = next(l for l in timing_rows if l.strip().startswith("stage1 "))
  none_ms, xla_ms, pallas_ms = (float(v) for v in row.split()[2:5])
  assert none_ms > 0 and xla_ms > 0 and pallas_ms != pallas_ms  # nan


def test_each_pass_alone_and_only_pallas(tmp_path, monkeypatch, capsys):
  """--passes times the six passes; --impls pallas leaves "none" and "xla" untimed (the
  table shows '-'); the per-pass byte counts follow the hand count."""
  monkeypatch.setattr(fused, "EQ3_SHAPES", SHAPES[:1])
  record = tmp_path / "results.jsonl"
  assert fused.main(ARGS + ["--passes", "--impls", "pallas", "--record", str(record)]) == 0
  r = json.loads(record.read_text())
  assert set(r["network_ms"]) == {"pallas"}
  assert [p["pass"] for p in r["passes"]] == list(fused.PASSES)
  for p in r["passes"]:
    assert p["ms"]["xla"] > 0 and p["ms"]["pallas"] > 0, p
    if p["pass"] in ("pad", "du", "du_ad"):  # XLA in both: timed once
      assert p["ms"]["xla"] == p["ms"]["pallas"]
  assert "each pass alone" in capsys.readouterr().out
  assert "| - | - |" in table.table(str(record))
  # Stage 1 at batch 256 by hand: u 256*56*56*64*2, the padded u 256*58*66*64*2 (one
  # pixel each side, the right side widened to the 64-wide tap loads), hidden x4.
  u, u_pad, hidden = 256 * 56 * 56 * 64 * 2, 256 * 58 * 66 * 64 * 2, 256 * 56 * 56 * 256 * 2
  want = {"pad": u + u_pad, "stats": u + 2 * u_pad, "apply": u + 2 * u_pad + 2 * hidden,
          "sums": u + 2 * u_pad + 3 * hidden, "dx": u + 2 * u_pad + 3 * hidden,
          "du": hidden + u, "du_ad": hidden + u}
  got = fused.pass_gbytes_each(256, 56, 64, 1)
  assert got == pytest.approx({k: v / 1e9 for k, v in want.items()}, rel=1e-12)
  with pytest.raises(SystemExit):
    fused.main(ARGS + ["--impls", "pallas,cuda"])


def test_best_tiling(tmp_path):
  """The fastest "pallas" network time among the newest device's records; records of
  other devices and untimed (NaN) ones do not count."""
  path = tmp_path / "r.jsonl"
  recs = [("gpu:A", [4, 2048, 4, 0, 1], 10.0), ("gpu:B", [4, 4096, 4, 0, 1], 30.0),
          ("gpu:B", [4, 8192, 4, 16, 1], float("nan")), ("gpu:B", [2, 1024, 4, 0, 1], 20.0),
          ("gpu:B", [4, 8192, 8, 32, 2], 25.0)]
  with open(path, "w") as f:
    f.write(json.dumps({"model": "m"}) + "\n")  # a train-step record: skipped
    for dev, t, ms in recs:
      f.write(json.dumps({"kind": "fused_op", "device": dev, "tiling_values": t,
                          "network_ms": {"pallas": ms}}) + "\n")
  assert fused.best_tiling(str(path)) == "2,1024,4,0,1"
  assert fused.main(["--best-of", str(path)]) == 0
  empty = tmp_path / "e.jsonl"
  empty.write_text(json.dumps({"model": "m"}) + "\n")
  assert fused.best_tiling(str(empty)) is None and fused.main(["--best-of", str(empty)]) == 1


def test_the_check_given_the_weights_covers_what_the_kernels_make(monkeypatch, capsys):
  """--weights --check-only: the operation given C's and A's weights, with c, dp and
  the weight gradients made in the kernels, u's shares added in du's kernel and A
  applied in the product's (every dot form, interpreted), agrees with float64 autodiff
  of the model's matmuls and shortcut around the reference, and the run stops after the
  check; pass 4 summed the weight gradients at both shapes, the product applied A at
  both, and du's kernel added C's share and the shortcut's at stride 1. Planted: c and
  dp made 0.1% too large in the kernels; the shortcut's share left out of du's kernel
  (exit 1)."""
  from qlhs_jax.kernels import stencil
  monkeypatch.setattr(fused, "EQ3_SHAPES", SHAPES)
  for var, value in (("QLHS_PRODUCT_FORM", "pallas_dot"), ("QLHS_SUMS_FORM", "pallas_dot"),
                     ("QLHS_STATS_FORM", "pallas_dot"), ("QLHS_C_FORM", "kernels"),
                     ("QLHS_DP_FORM", "kernels"), ("QLHS_WEIGHT_GRADS", "pass4"),
                     ("QLHS_DU_FORM", "pallas"), ("QLHS_DU_SUM", "kernel"),
                     ("QLHS_P_FORM", "kernels"),
                     ("QLHS_STENCIL_TILING", "product_dot=8,4,2,2 sums_dot=8,4,2,2 "
                      "grads_dot=8,4,2,2 stats_dot=16,4,2,2 product_a_dot=8,4,2,2")):
    monkeypatch.setenv(var, value)
  applied, real_a = [], stencil.product_a
  monkeypatch.setattr(stencil, "product_a", lambda *a, **k: applied.append(1) or real_a(
      *a, **k))
  summed, real = [], stencil.dx_dc
  monkeypatch.setattr(stencil, "dx_dc", lambda *a, **k: summed.append(
      k.get("w_grads")) or real(*a, **k))
  addends, real_du = [], stencil.d_transpose
  monkeypatch.setattr(stencil, "d_transpose", lambda *a, **k: addends.append(
      len(k["addends"])) or real_du(*a, **k))
  assert fused.main(ARGS + ["--weights", "--check-only"]) == 0
  out = capsys.readouterr().out
  assert "given C's and A's weights" in out and "forward + backward" not in out
  assert summed == [True, True], summed  # "xla" at both shapes ("pallas" has no dx_dc)
  assert len(applied) == 2, applied  # the product applied A at both shapes, p not kept
  # stride 1, "xla" then "pallas": C's share and the shortcut's; stride 2: none
  assert addends == [2, 2, 0, 0], addends
  monkeypatch.setattr(stencil, "d_transpose", lambda *a, **k: real_du(
      *a, **dict(k, addends=k["addends"][:1])))
  assert fused.main(ARGS + ["--weights", "--check-only"]) == 1
  monkeypatch.setattr(stencil, "d_transpose", real_du)
  rounded = stencil._rounded_dot
  monkeypatch.setattr(stencil, "_rounded_dot", lambda a, b: rounded(a, b) * 1.001)
  assert fused.main(ARGS + ["--weights", "--check-only"]) == 1
