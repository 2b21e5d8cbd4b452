"""The Pallas kernels compile to an sm_90a cubin with Triton's own compiler (no GPU).

The compiles run where the ``triton`` package is installed (``pip install
triton==3.9.0``; it is not a dependency, CI skips them); benchmarks/NOTES.md records the
full report. The instruction counting and the issue floor are checked everywhere."""

import importlib.util
import re

import pytest

from qlhs_jax.benchmarks import triton_compile

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="needs Triton's compiler: pip install triton==3.9.0")

# A made-up disassembly in nvdisasm's format: 3 instructions before a loop of 4 (its
# label, then up to the conditional branch back), 2 after, then the trap loop.
SASS = """\
        .text.k:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   MOV R2, RZ ;
.L_x_0:
        /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0040*/                   FFMA R8, R4, R5, R8 ;
        /*0050*/                   ISETP.GE.AND P0, PT, R2, 0x10, PT ;
        /*0060*/               @!P0 BRA `(.L_x_0) ;
        /*0070*/                   STG.E desc[UR4][R6.64], R8 ;
        /*0080*/                   EXIT ;
.L_x_1:
        /*0090*/                   BRA `(.L_x_1);
"""


def test_sass_counts_count_instructions_and_the_loop_body():
  """Every instruction (the trap loop's branch too), and the loop from its label to the
  conditional branch back; a kernel without one has loop 0."""
  assert triton_compile.sass_counts(SASS) == {"instructions": 10, "loop": 4}
  no_loop = SASS.replace("@!P0 BRA `(.L_x_0)", "ISETP.NE.AND P1, PT, R2, RZ, PT")
  assert triton_compile.sass_counts(no_loop) == {"instructions": 10, "loop": 0}
  # A loop whose body holds a branch of its own ends with an unconditional branch back
  # (ptxas, for a lax.cond inside a walk): the body, its branch included, is the loop.
  branchy = SASS.replace("@!P0 BRA `(.L_x_0)", "BRA `(.L_x_0)").replace(
      "        /*0040*/                   FFMA R8, R4, R5, R8 ;\n",
      "        /*0040*/               @P0 BRA `(.L_x_2) ;\n"
      "        /*0044*/                   FFMA R8, R4, R5, R8 ;\n.L_x_2:\n")
  assert triton_compile.sass_counts(branchy) == {"instructions": 11, "loop": 5}


def test_the_inner_loop_is_the_loop_nested_in_the_first():
  """A loop inside the first loop (stencil.product_a's blocks inside its tiles): its
  label to its branch back; the outer loop's count holds it once. None without one;
  a forward branch's label inside the loop is not a loop."""
  nested = SASS.replace(
      "        /*0040*/                   FFMA R8, R4, R5, R8 ;\n",
      ".L_x_5:\n"
      "        /*0040*/                   FFMA R8, R4, R5, R8 ;\n"
      "        /*0044*/                   FFMA R9, R4, R5, R9 ;\n"
      "        /*0048*/               @P1 BRA `(.L_x_5) ;\n")
  assert triton_compile.sass_counts(nested) == {"instructions": 12, "loop": 6}
  inner = triton_compile.inner_loop(nested)
  assert inner.splitlines()[0] == ".L_x_5:"
  assert triton_compile.sass_counts(inner)["instructions"] == 3
  assert triton_compile.inner_loop(SASS) is None
  forward = SASS.replace(
      "        /*0040*/                   FFMA R8, R4, R5, R8 ;\n",
      "        /*0040*/               @P0 BRA `(.L_x_2) ;\n.L_x_2:\n")
  assert triton_compile.inner_loop(forward) is None


def test_issue_floor_counts_the_loop_once_per_trip():
  """(100 + 10 * (5 - 1)) instructions x 4 warps x 1,056 programs over 528 schedulers at
  1.98 GHz: 1,120 cycles, 565.66 ns."""
  floor = triton_compile.issue_floor_ms(100, 10, 5, 4, 1056)
  assert floor == pytest.approx(140 * 4 * 1056 / 528 / 1.98e9 * 1e3, rel=1e-12)
  assert floor == pytest.approx(5.6566e-4, rel=1e-4)
  assert triton_compile.issue_floor_ms(100, 0, 1, 4, 1056) < floor


@needs_triton
@pytest.mark.parametrize("tiling,spills", [("", None), ("4,4096,4,16", 0)])
def test_stage1_kernels_compile(monkeypatch, capsys, tiling, spills):
  """The default tiling (8,192-value whole-row tiles, the fastest on an H100) compiles;
  ptxas spills a few bytes in its backward kernels, which is reported. Whole-channel
  tiles of 16 columns compile without spills."""
  monkeypatch.setenv("QLHS_PALLAS_TILING", tiling)
  assert triton_compile.main(["--shapes", "stage1,stage2_block0"]) == 0
  out = capsys.readouterr().out
  for kernel in ("stats", "apply", "sums", "dx"):
    assert out.count(f"qlhs_{kernel}_kernel") == 2, kernel
  rows = [l for l in out.splitlines() if "registers" in l]
  assert len(rows) == 8 and "FAILED" not in out, out
  if spills is not None:
    assert all(f" {spills} B spilled" in l for l in rows), out


@needs_triton
def test_the_product_with_a_compiles_where_it_applies(monkeypatch, capsys):
  """--op product_a: QLHS_P_FORM=kernels's forward product at the blocks of at most 128
  channels in and out (stages 1 and 2; wider blocks keep p, so stage 3 is left out),
  each with its inner loop's count and an issue floor that counts the inner loop's
  trips a tile: the stage-2 block (eight blocks of channels a tile) has a floor above
  the stride-2 block's (four, on a quarter of stage 1's pixels)."""
  monkeypatch.delenv("QLHS_STENCIL_TILING", raising=False)
  assert triton_compile.main(["--op", "product_a"]) == 0
  out = capsys.readouterr().out
  rows = {l.split()[0]: l for l in out.splitlines() if "qlhs_product_a_dot" in l}
  assert sorted(rows) == ["stage1", "stage2", "stage2_block0"], out
  assert " x 4 a tile" in rows["stage1"] and " x 8 a tile" in rows["stage2"], out
  floor = {k: float(re.search(r"issue floor ([\d.]+) ms", v).group(1))
           for k, v in rows.items()}
  assert floor["stage2"] > floor["stage2_block0"] > 0, floor


@needs_triton
def test_eq3_block_kernels_compile(capsys):
  """fuse_d_bn="block"'s three kernels compile at stage 3 and at stage 4's first
  (strided, gathered taps) block (batch 256, default tiling) without spills."""
  assert triton_compile.main(["--op", "eq3_block", "--shapes",
                              "stage3,stage4_block0"]) == 0
  out = capsys.readouterr().out
  rows = [l for l in out.splitlines() if "registers" in l]
  assert len(rows) == 6 and "FAILED" not in out, out
  for kernel in ("forward", "sums", "dx"):
    assert f"qlhs_eq3_{kernel}_kernel" in out, kernel
  assert all(" 0 B spilled" in l for l in rows), out


@needs_triton
def test_broken_ir_is_reported():
  r = triton_compile.compile_ir("bad", "module @bad { tt.func @bad() { tt.bogus } }",
                                "90a", 4)
  assert r["ok"] is False and r["error"]


@needs_triton
def test_stencil_kernels_compile_without_spills(capsys):
  """kernels.stencil's statistics (one launch; from lags too at stride 1), pass-3 sums,
  du, product and dx kernels, and at stride 1 pass 4 with du as one walk (dx_du),
  compile at the default tiling without spills, strides 1 and 2 (batch 256). du's lean
  taps (stride 1) and parity classes (stride 2) keep its instruction count per warp
  well below the 848 and 984 of per-row indices and nine masked taps (616 and 424 with triton 3.9.0; benchmarks/NOTES.md experiment 16)."""
  assert triton_compile.main(["--op", "stencil", "--shapes", "stage1,stage2_block0"]) == 0
  out = capsys.readouterr().out
  rows = [l for l in out.splitlines() if "registers" in l]
  assert len(rows) == 14 and "FAILED" not in out, out
  assert sum("qlhs_dx_du" in l for l in rows) == 1, out
  assert sum("qlhs_bwd" in l for l in rows) == 1, out
  assert sum("qlhs_du_bn" in l for l in rows) == 1, out
  assert sum("qlhs_product" in l for l in rows) == 2, out
  assert sum("qlhs_dx_dc" in l for l in rows) == 2, out
  assert sum("qlhs_tap_stats" in l for l in rows) == 2, out
  assert sum("qlhs_lag_sums" in l for l in rows) == 1, out
  assert sum("qlhs_bn_sums" in l for l in rows) == 2, out
  assert all(" 0 B spilled" in l for l in rows), out
  du = {l.split()[0]: int(l.split("instructions")[0].split()[-1])
        for l in rows if "qlhs_d_transpose" in l}
  assert du["stage1"] <= 700 and du["stage2_block0"] <= 550, du
  assert all("issue floor" in l for l in rows), out


@needs_triton
def test_row_walks_compile_without_spills_and_issue_less(monkeypatch, capsys):
  """QLHS_STENCIL_ROWS=all at stage 1: du's, the sums', the product's and pass 4's walks
  compile without spills, each a loop over the strip's rows (the walk's trip count in
  the issue floor), and du's issue floor is below the tiles' 0.237 ms (0.162 with
  triton 3.9.0: three loads of each row of dx instead of nine taps)."""
  monkeypatch.setenv("QLHS_STENCIL_ROWS", "all")
  assert triton_compile.main(["--op", "stencil", "--shapes", "stage1"]) == 0
  out = capsys.readouterr().out
  rows = {l.split()[1]: l for l in out.splitlines() if "registers" in l}
  assert "FAILED" not in out and all(" 0 B spilled" in l for l in rows.values()), out
  for kernel in ("qlhs_bn_sums", "qlhs_d_transpose", "qlhs_product", "qlhs_dx_dc"):
    assert int(rows[kernel].split("loop")[1].split()[0]) > 0, rows[kernel]
  assert float(rows["qlhs_d_transpose"].split("issue floor")[1].split()[0]) < 0.2, out


@needs_triton
def test_dx_du_walk_issues_less_than_pass_4_then_du():
  """stencil.dx_du at stage 1 (batch 256): no spills; its issue floor below the 0.470
  ms of the two kernels it replaces (pass 4's and du's tiles, 0.233 + 0.237 with triton
  3.9.0; the walk 0.378); and the barrier between writing dx's row and reading it back
  at three shifts is in the kernel (on the CPU the walk runs interpreted, one program
  at a time, where no test can see a missing one)."""
  import math
  ir = {name: (text, grid) for name, text, grid in
        triton_compile.triton_ir(256, 56, 64, 1, "stencil")}
  text, grid = ir["qlhs_dx_du"]
  assert text.count("gpu.barrier") == 1, text
  r = triton_compile.compile_ir("qlhs_dx_du", text, "90a", 4)
  assert r["ok"] and r["spill_bytes"] == 0 and r["loop"] > 0, r
  trips = triton_compile.stencil_trips("qlhs_dx_du", 256, 56, 64, 1)
  assert trips == 58, trips  # 56 rows and the two that border them
  floor = triton_compile.issue_floor_ms(r["instructions"], r["loop"], trips, 4,
                                        math.prod(grid))
  assert floor < 0.45, floor


@needs_triton
def test_bwd_and_du_bn_compile_at_every_stride_1_shape(capsys):
  """stencil.bwd and stencil.du_bn compile without spills at stages 1-4 (batch 256):
  whole-row strips at stages 1-2, images side by side at 3-4, where du_bn's walk is
  not unrolled (unrolled, Triton's TTGIR passes did not finish at stage 4 in 200 s).
  bwd has the barrier between writing a row of g * mul and reading it back, du_bn none
  (no hidden row, u's rows are its input); du_bn's issue floor at stage 1 stays
  below du's tiles' 0.237 ms (0.120 with triton 3.9.0: five rows a trip)."""
  import math
  assert triton_compile.main(["--op", "stencil", "--shapes", "stage2,stage3,stage4"]) == 0
  out = capsys.readouterr().out
  rows = [l for l in out.splitlines() if "qlhs_bwd" in l or "qlhs_du_bn" in l]
  assert len(rows) == 6 and "FAILED" not in out, out
  assert all(" 0 B spilled" in l for l in rows), out
  ir = {name: (text, grid) for name, text, grid in
        triton_compile.triton_ir(256, 56, 64, 1, "stencil")}
  assert ir["qlhs_bwd"][0].count("gpu.barrier") == 1
  assert ir["qlhs_du_bn"][0].count("gpu.barrier") == 0
  text, grid = ir["qlhs_du_bn"]
  r = triton_compile.compile_ir("qlhs_du_bn", text, "90a", 4)
  assert r["ok"] and r["spill_bytes"] == 0 and r["loop"] > 0, r
  trips = triton_compile.stencil_trips("qlhs_du_bn", 256, 56, 64, 1)
  # 56 rows: the first, ten trips of five, the last five written out after the loop
  assert trips == 10, trips
  floor = triton_compile.issue_floor_ms(r["instructions"], r["loop"], trips, 4,
                                        math.prod(grid))
  assert floor < 0.2, floor
