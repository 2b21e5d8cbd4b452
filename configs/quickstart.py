r"""Quickstart: a tiny Eq.(3) network on the embedded digits (scikit-learn), 2-core CPU.

  python -m qlhs_jax.main --config=configs/quickstart.py --workdir=/tmp/qlhs_quickstart

The argument picks any registered model, e.g. ``configs/quickstart.py:eq3w_softball_ds``
(default eq3_softball_ds). Digits at 32 px (1,437 train / 360 validation images), widths
(16, 32, 64, 128), one block per stage, small stem, float32, batch 64, 12 epochs with
the recipe's optimizer and schedule (1 warmup epoch).

Hardware: a 2-core CPU. Expected: 1.5-4 minutes (idle machine), validation top-1 0.95 for
the default model, within about 0.01 as rounding changes (README, Quickstart, gives the
measured figures).
"""

from qlhs_jax import config as qconfig
from qlhs_jax.models import registry


def get_config(arg=None):
  name = arg or "eq3_softball_ds"
  if name not in registry.names():
    raise ValueError(f"configs/quickstart.py:{name}: unknown model; choose one of "
                     f"{registry.names()}")
  return qconfig.apply_quickstart(qconfig.base_config(name))
