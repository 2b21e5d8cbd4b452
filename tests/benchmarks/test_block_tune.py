"""benchmarks.block_tune: picks each kernel's fastest tiling per shape, and its SPEC line
gives the kernels those tilings (the selection with made-up times; one real run with the
kernels interpreted on the CPU)."""

import json

import pytest

from qlhs_jax.benchmarks import block_tune, table
from qlhs_jax.kernels import eq3_block

# (name, side, n, n_out, stride, blocks)
SHAPES = [("big", 8, 16, 16, 1, 3), ("strided", 16, 16, 32, 2, 1)]
TILINGS = [(32, 4), (64, 8), (128, 8)]


def fake_times(todo):
  """Known times: forward fastest at 32,4; sums at the default 64,8; dx at 128,8, which
  fails to compile at the strided shape (there 32,4 wins); every kernel moves 1 MB."""
  fastest = {"forward": (32, 4), "sums": (64, 8), "dx": (128, 8)}
  out = {}
  for (k, t), plan in todo.items():
    key = eq3_block.shape_key(plan["h"], plan["w"], plan["n"], plan["n_out"],
                              plan["stride"])
    # The sums kernel's tilings carry its channels per slice (all 16 here).
    assert t == (plan["m"], plan["warps"]) + ((plan["bj"],) if k == "sums" else ())
    if k == "dx" and t == (128, 8) and key.endswith("s2"):
      out[(k, t)] = None
    else:
      out[(k, t)] = (1.0 if t[:2] == fastest[k] else 2.0 + t[0] / 1000, 1e6)
  return out


def test_the_fastest_tiling_is_chosen_and_the_spec_gives_it(monkeypatch):
  monkeypatch.delenv("QLHS_BLOCK_TILING", raising=False)
  lines = []
  r = block_tune.tune(SHAPES, 2, TILINGS, fake_times, log=lines.append)
  big, strided = "8x8x16x16s1", "16x16x16x32s2"
  assert eq3_block.parse_tiling(r["spec"]) == {
      f"dx@{big}": (128, 8), f"dx@{strided}": (32, 4), f"forward@{big}": (32, 4),
      f"forward@{strided}": (32, 4)}
  # current tiling (64,8): forward 2.064, sums 1, dx 2.064; tuned: 1 + 1 + 1 (big, x3),
  # and 1 + 1 + 2.032 (strided: its dx's fastest, 128,8, failed)
  assert r["network_ms"]["current"] == pytest.approx(4 * (2.064 + 1 + 2.064))
  assert r["network_ms"]["tuned"] == pytest.approx(3 * 3 + 1 + 1 + 2.032)
  assert [line for line in lines if line.startswith("tiling: ")][-1] == f"tiling: {r['spec']}"
  assert any("128,8: failed" in line for line in lines)
  monkeypatch.setenv("QLHS_BLOCK_TILING", r["spec"])
  assert eq3_block.tiling("dx", big) == (128, 8) and eq3_block.tiling("dx", strided) == (32, 4)
  assert eq3_block.tiling("sums", big) == eq3_block.DEFAULT_TILING
  # With QLHS_BLOCK_TILING set, its tilings are the "current" ones timed first.
  r2 = block_tune.tune(SHAPES[:1], 2, TILINGS, fake_times, log=lambda _: None)
  assert eq3_block.parse_tiling(r2["spec"]) == {f"dx@{big}": (128, 8),
                                                f"forward@{big}": (32, 4)}
  assert r2["network_ms"]["current"] == pytest.approx(3 * 3)


def test_tilings_that_give_the_same_kernel_are_timed_once():
  """With 32 rows (batch 2 of 4x4 pixels), 64,8 and 128,8 are both a 32-pixel tile."""
  seen = []

  def times(todo):
    seen.extend(todo)
    return {kt: (1.0, 1e6) for kt in todo}
  r = block_tune.tune([("small", 4, 16, 16, 1, 1)], 2, TILINGS, times, log=lambda _: None)
  assert sorted(seen) == sorted((k, t + ((16,) if k == "sums" else ()))
                                for k in block_tune.KERNEL_NAMES for t in ((32, 8), (32, 4)))
  # Ties keep the first timed, the current tiling (64,8, capped at 32 rows): the default
  # in effect, so no entry.
  assert r["spec"] == "64,8"


def test_the_budget_stops_before_the_next_shape():
  lines = []
  r = block_tune.tune(SHAPES, 2, TILINGS, fake_times, budget_s=0, log=lines.append)
  assert [s["name"] for s in r["shapes"]] == ["big"]
  assert any("strided and later shapes keep" in line for line in lines)


def test_block_max_width_minimises_the_hidden_path_time():
  # (n, blocks, block ms, xla ms): the kernels win at 64 and 128, lose at 256 and 512.
  rows = [(64, 3, 1.0, 2.0), (128, 3, 1.0, 1.5), (256, 5, 2.0, 1.0), (512, 2, 3.0, 1.0)]
  assert block_tune.best_max_width(rows) == 128
  assert block_tune.best_max_width(rows[:2]) == 0  # the kernels win at every width timed
  assert block_tune.best_max_width([(64, 3, 2.0, 1.0)]) == 1  # every block on "xla"
  # 256 wins at 256 alone but loses more at 512 than it gains: 128.
  assert block_tune.best_max_width(rows[:2] + [(256, 1, 0.9, 1.0), (512, 2, 3.0, 1.0)]) == 256
  # A path that failed counts as infinitely slow: "xla" at 256, where "block" failed.
  assert block_tune.best_max_width(rows[:2] + [(256, 5, None, 1.0)]) == 128
  assert block_tune.best_max_width([(64, 3, None, 1.0)]) == 1
  assert block_tune.best_max_width([(64, 3, 1.0, None)]) == 0
  assert block_tune.best_max_width([(64, 3, None, None)]) is None


def test_tune_prints_block_max_width_after_each_shape(monkeypatch):
  monkeypatch.delenv("QLHS_BLOCK_TILING", raising=False)
  lines, specs = [], []

  def paths(u_shape, n_out, stride, spec):
    specs.append(spec)
    return {"block": 1.0, "xla": 2.0} if u_shape[1] == 8 else {"block": 3.0, "xla": 1.0}
  wide = [("big", 8, 16, 16, 1, 3), ("wide", 4, 32, 32, 1, 2)]
  r = block_tune.tune(wide, 2, TILINGS, fake_times, log=lines.append, time_paths=paths)
  assert [l for l in lines if l.startswith("block_max_width")] == [
      "block_max_width: 0", "block_max_width: 16"]
  assert r["block_max_width"] == 16 and specs[0] == "dx@8x8x16x16s1=128,8 forward@8x8x16x16s1=32,4"
  assert r["network_ms"]["hidden_path_chosen"] == pytest.approx(3 * 1.0 + 2 * 1.0)


def test_sums_candidates_widen_the_slices(monkeypatch):
  """At stage 2 (n 128, automatic 16 channels per slice) the sums kernel is also timed
  at 32 and 64 channels; the pick goes into the spec with its channels."""
  monkeypatch.delenv("QLHS_BLOCK_TILING", raising=False)
  assert block_tune.candidates("sums", (64, 8), [(32, 8)], 16, 128) == [
      (64, 8), (64, 8, 32), (64, 8, 64), (32, 8), (32, 8, 32), (32, 8, 64)]
  assert block_tune.candidates("sums", (64, 8), [], 64, 64) == [(64, 8)]  # at most n
  assert block_tune.candidates("dx", (64, 8), [(32, 8)], 16, 128) == [(64, 8), (32, 8)]

  def times(todo):
    return {(k, t): (1.0 if (k, t) == ("sums", (32, 8, 32)) else 2.0, 1e6) for k, t in todo}
  r = block_tune.tune([("stage2", 28, 128, 128, 1, 3)], 256, [(32, 8)], times,
                      log=lambda _: None)
  assert r["spec"] == "sums@28x28x128x128s1=32,8,32"
  monkeypatch.setenv("QLHS_BLOCK_TILING", r["spec"])
  plan = eq3_block._plan((256, 28, 28, 128), 128, 4, 1, "sums")
  assert (plan["m"], plan["warps"], plan["bj"]) == (32, 8, 32)
  assert block_tune.l2_gbytes("sums", plan) == pytest.approx(
      16 * 2 * 256 * 28 * 28 * 128 * 2 / 1e9)  # 16 slices, half of the automatic 32


def test_l2_estimate_against_a_hand_count():
  """Stage 1 at batch 256: 12,544 tiles of 64 pixels, each loading C (64x256) and A
  (256x64) in bfloat16; the sums kernel's 8 slices (bj 32, e 4) each read u and dy
  (802,816 pixels x 64 channels x 2 bytes each)."""
  plan = lambda k: eq3_block._plan((256, 56, 56, 64), 64, 4, 1, k, tile=(64, 8))
  assert block_tune.l2_gbytes("forward", plan("forward")) == pytest.approx(
      12544 * 2 * 64 * 256 * 2 / 1e9)
  assert block_tune.l2_gbytes("sums", plan("sums")) == pytest.approx(
      8 * 2 * 802816 * 64 * 2 / 1e9)


def test_device_bytes_against_a_hand_count():
  """Stage 1's forward kernel at batch 256 (tile 64, so 802,816 output rows exactly):
  u and y rows (802,816 x 64, bfloat16), C_s and A_s (4 x 64 x 64, bfloat16), D_s
  (4 x 9 x 64) and mul, add (4 x 64) in float32."""
  plan = eq3_block._plan((256, 56, 56, 64), 64, 4, 1, "forward", tile=(64, 8))
  args = block_tune.arg_shapes("forward", plan)
  rows = 256 * 56 * 56
  want = 2 * rows * 64 * 2 + 2 * 4 * 64 * 64 * 2 + (4 * 9 * 64 + 2 * 4 * 64) * 4
  assert block_tune.io_bytes("forward", plan, args) == want


def test_arg_shapes_are_what_the_op_passes(monkeypatch):
  """The shapes block_tune times the kernels with are those eq3_hidden hands them."""
  import jax
  seen = {}
  for k in eq3_block.KERNELS:
    real = eq3_block.CALLS[k]

    def spy(plan, args, interpret=False, k=k, real=real):
      seen[k] = ([(a.shape, a.dtype) for a in args], plan)
      return real(plan, args, interpret)
    monkeypatch.setitem(eq3_block.CALLS, k, spy)
    monkeypatch.setattr(eq3_block, f"{k}_call", spy)
  args = block_tune.path_args((2, 8, 8, 16), 32, 2)
  jax.block_until_ready(block_tune.hidden_path("block", 2, True)(*args))  # fwd + bwd
  assert set(seen) == set(eq3_block.KERNELS)
  for k, (shapes, plan) in seen.items():
    assert shapes == [(a.shape, a.dtype) for a in block_tune.arg_shapes(k, plan)], k


def test_all_failed_keeps_the_current_tiling():
  r = block_tune.tune(SHAPES[:1], 2, TILINGS, lambda todo: dict.fromkeys(todo),
                      log=lambda _: None)
  assert r["spec"] == "64,8" and r["network_ms"] == {"current": 0.0, "tuned": 0.0}


def test_shapes_most_traffic_first():
  names = [s[0] for s in block_tune.block_shapes()]
  assert names[:3] == ["stage1", "stage2", "stage3"] and len(names) == 7


def test_interpreted_run_records(tmp_path, capsys, monkeypatch):
  """The real kernels, interpreted: each compiles and runs with tune's arguments at two
  tilings, and the record reaches the results table."""
  monkeypatch.delenv("QLHS_BLOCK_TILING", raising=False)
  rec = tmp_path / "r.jsonl"
  assert block_tune.main(["--batch", "2", "--size-scale", "8", "--shapes", "stage2_block0",
                          "--tilings", "16,4", "--calls", "1", "--repeats", "1",
                          "--record", str(rec)]) == 0
  out = capsys.readouterr().out
  assert out.count("failed") == 0 and out.count(" -> ") == 3, out
  assert "hidden path forward+backward: block " in out and "block_max_width: " in out
  r = json.loads(rec.read_text())
  assert r["kind"] == "block_tune" and set(r["shapes"][0]["kernels"]) == {
      "forward", "sums", "dx"}
  eq3_block.parse_tiling(r["spec"])
  assert r["block_max_width"] in (0, 1)  # one width timed: all kernels or all "xla"
  assert "block_tune" in table.table(str(rec))
  assert block_tune.main(["--l2", "--shapes", "stage1"]) == 0
  assert "stage1" in capsys.readouterr().out


def test_wide_tilings_are_tried_only_on_wide_blocks(monkeypatch):
  """16 warps are compiled and timed at input widths >= WIDE_MIN_N (where they do not
  spill), not at stage 2; a 16-warp pick lands in the spec."""
  monkeypatch.delenv("QLHS_BLOCK_TILING", raising=False)
  seen = []

  def times(todo):
    seen.extend(todo)
    return {(k, t): (1.0 if t[1] == 16 else 2.0, 1e6) for k, t in todo}
  shapes = [("stage2", 28, 128, 128, 1, 3), ("stage3", 14, 256, 256, 1, 5)]
  r = block_tune.tune(shapes, 256, [(64, 8)], times, log=lambda _: None,
                      wide_tilings=block_tune.WIDE_TILINGS)
  assert block_tune.WIDE_MIN_N == 256
  sixteen = sorted((k, t) for k, t in seen if t[1] == 16)
  # at stage 3 the plan caps the tile at 8,192/256 = 32 pixels
  assert sixteen == [("dx", (32, 16)), ("forward", (32, 16)), ("sums", (32, 16, 16)),
                     ("sums", (32, 16, 32)), ("sums", (32, 16, 64))]
  assert eq3_block.parse_tiling(r["spec"]) == {
      f"{k}@14x14x256x256s1": t for k, t in
      [("dx", (32, 16)), ("forward", (32, 16)), ("sums", (32, 16, 16))]}


@pytest.mark.parametrize("flag,value", [("--tilings", "64,3"), ("--wide-tilings", "48,8"),
                                        ("--tilings", "64")])
def test_bad_tilings_are_refused(flag, value):
  with pytest.raises(SystemExit, match=f"{flag} '{value}': want pixels,warps"):
    block_tune.main(["--l2", flag, value])
