"""The device check of fuse_d_bn="block" (qlhs_jax.benchmarks.block_check), on the CPU
with the kernels interpreted: it passes the kernels and catches a wrong one."""

from qlhs_jax.benchmarks import block_check
from qlhs_jax.kernels import eq3_block

TINY = [("tiny_strided", 8, 16, 32, 2)]


def test_the_kernels_agree_with_float64(monkeypatch, capsys):
  monkeypatch.setattr(block_check, "SHAPES", TINY)
  assert block_check.main(["--batch", "2"]) == 0
  out = capsys.readouterr().out
  assert out.count(" ok") == len(block_check.NAMES) and "all agree" in out, out


def test_a_wrong_kernel_is_caught(monkeypatch, capsys):
  """y 2% too large (a rounding-size error the plain path does not make) fails."""
  monkeypatch.setattr(block_check, "SHAPES", TINY)
  right = eq3_block.eq3_hidden

  def wrong(*a, **kw):
    y, mean, var = right(*a, **kw)
    return y * 1.02, mean, var
  monkeypatch.setattr(eq3_block, "eq3_hidden", wrong)
  assert block_check.main(["--batch", "2"]) == 1
  out = capsys.readouterr().out
  assert "tiny_strided   y " in out and "WRONG" in out and "DISAGREEMENT" in out, out
