r"""Eq.(4): ``(C u) * A( BN(D u) )``; ImageNet-100, 50 epochs, 224 px.

  python -m qlhs_jax.main --config=configs/eq4.py --workdir=$HOME/runs/eq4

Paper (Table 1): top-1 81.88, 5.70M parameters (activation blank in Table 1; softball@ds assumed).
``configs/eq4.py:quickstart`` is the embedded-digits laptop version.

Hardware: one H100 80GB, batch 256, bfloat16; about the time of Eq.(3) (configs/eq3.py),
scaled by the harness's step rate of this model (python -m qlhs_jax.benchmarks.step
--model eq4_softball_ds); not yet run end to end here.
Expected: the paper's top-1 above.
"""

from qlhs_jax import config as qconfig


def get_config(arg=None):
  model, options = qconfig.parse_arg(arg, {"softball_ds": "eq4_softball_ds"},
                                     "softball_ds")
  c = qconfig.base_config(model)
  return qconfig.apply_options(c, options)
