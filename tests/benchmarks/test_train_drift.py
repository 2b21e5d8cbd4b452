"""benchmarks/train_drift.py: the drift of a fused path from the plain one over train steps."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_drift.py"


def load():
  spec = importlib.util.spec_from_file_location("train_drift", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_xla_stays_close_to_plain_and_a_wrong_step_shows(capsys):
  """Two steps: "xla" within float32 drift of the plain path (~3e-7 after one step,
  ~1e-3 after two: the zero-initialised BN_out scales are tiny, so their relative
  differences are large); one step more changes the parameters by ~1 on that measure,
  so a wrong step would show."""
  drift = load()
  traj = drift.trajectories(["none", "xla"], 2)
  assert drift.rel_diff(traj["xla"][0], traj["none"][0]) < 1e-5
  assert drift.rel_diff(traj["xla"][1], traj["none"][1]) < 5e-3
  assert drift.rel_diff(traj["none"][0], traj["none"][1]) > 0.1
  assert drift.rel_diff(traj["none"][1], traj["none"][1]) == 0
  drift.main(["--steps", "1", "--fuse", "xla"])
  out = capsys.readouterr().out
  assert out.splitlines()[0] == "step  xla vs none" and out.splitlines()[1].startswith("   1")
