"""The Pallas kernels compile to an sm_90a cubin with Triton's own compiler (no GPU).

Runs where the ``triton`` package is installed (``pip install triton==3.9.0``; it is not
a dependency, CI skips this); benchmarks/NOTES.md records the full report."""

import pytest

from qlhs_jax.benchmarks import triton_compile

triton = pytest.importorskip("triton")


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


def test_broken_ir_is_reported():
  r = triton_compile.compile_ir("bad", "module @bad { tt.func @bad() { tt.bogus } }",
                                "90a", 4)
  assert r["ok"] is False and r["error"]


def test_stencil_kernels_compile_without_spills(capsys):
  """kernels.stencil's statistics (one launch; from lags too at stride 1), pass-3 sums,
  du, product and dx kernels compile at the default tiling without spills, strides 1
  and 2 (batch 256)."""
  assert triton_compile.main(["--op", "stencil", "--shapes", "stage1,stage2_block0"]) == 0
  out = capsys.readouterr().out
  rows = [l for l in out.splitlines() if "registers" in l]
  assert len(rows) == 11 and "FAILED" not in out, out
  assert sum("qlhs_product" in l for l in rows) == 2, out
  assert sum("qlhs_dx_dc" in l for l in rows) == 2, out
  assert sum("qlhs_tap_stats" in l for l in rows) == 2, out
  assert sum("qlhs_lag_sums" in l for l in rows) == 1, out
  assert sum("qlhs_bn_sums" in l for l in rows) == 2, out
  assert all(" 0 B spilled" in l for l in rows), out
