"""The device-RandAugment comparison runs end to end and prints every op's row."""

from qlhs_jax.benchmarks import augment


def test_main_prints_every_op_and_the_examples(capsys):
  augment.main(["--examples", "2", "--size", "32"])
  out = capsys.readouterr().out
  for name in augment.ARGS:
    assert f"| {name} | " in out
  assert "2 train examples of 32 px (rand-m7-mstd0.5-inc1; " in out
  assert "% of op slots apply an op): " in out
