"""The Pallas kernels compile to an sm_90a cubin with Triton's own compiler (no GPU).

Runs where the ``triton`` package is installed (``pip install triton==3.9.0``; it is not
a dependency, CI skips this); benchmarks/NOTES.md records the full report."""

import pytest

from qlhs_jax.benchmarks import triton_compile

triton = pytest.importorskip("triton")


def test_stage1_kernels_compile_without_spills(capsys):
  assert triton_compile.main(["--shapes", "stage1,stage2_block0"]) == 0
  out = capsys.readouterr().out
  for kernel in ("stats", "apply", "sums", "dx"):
    assert out.count(f"qlhs_{kernel}_kernel") == 2, kernel
  rows = [l for l in out.splitlines() if "registers" in l]
  assert len(rows) == 8 and all(" 0 B spilled" in l for l in rows), out
  assert "FAILED" not in out


def test_broken_ir_is_reported():
  r = triton_compile.compile_ir("bad", "module @bad { tt.func @bad() { tt.bogus } }",
                                "90a", 4)
  assert r["ok"] is False and r["error"]
