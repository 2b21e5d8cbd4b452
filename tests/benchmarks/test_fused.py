"""benchmarks.fused: the agreement check can fail, the record feeds the README table."""

import json

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
  assert "| default |" in text and "BN(D u) * c alone" in text


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
