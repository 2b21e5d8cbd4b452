"""``benchmarks.erase_fill``: both generators timed in one run, on the recipe's batch."""

import json

from qlhs_jax.benchmarks import erase_fill


def test_times_each_generator_and_their_ratio(capsys):
  erase_fill.main(["--batch", "3", "--size", "16", "--repeats", "2"])
  r = json.loads(capsys.readouterr().out)
  assert r["batch"] == 3 and r["size"] == 16 and r["device"].startswith("cpu")
  assert r["hash_ms"] > 0 and r["threefry_ms"] > 0
  # The ratio of the unrounded times; each time printed to 4 significant digits (up to
  # 5e-4 of it), the ratio to 3 decimals.
  ratio = r["threefry_ms"] / r["hash_ms"]
  assert abs(r["threefry_over_hash"] - ratio) <= 0.0005 + 1e-3 * ratio + 1e-9
